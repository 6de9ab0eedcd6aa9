"""Stage 2 (CellSpec -> FusedPlan): the facts of a cell, and the fused plan built from them.

Facts, never printing:

* every ``linear`` is split over its operands; an operand that is the input ``x``
  or a *delay state* (a state updated to the input, i.e. x_{t-1}) is **hoisted**:
  all such parts of all linears become column blocks of ONE GEMM over T*B rows;
* every other operand is **recurrent**; its *stage* is how many recurrent GEMMs
  must finish before it can be computed (a state: 0; ``r * h`` in TF's GRU: 1);
  the parts at one stage become ONE concatenated-weight GEMM;
* the elementwise work goes to the earliest epilogue after which it can run:
  operands of GEMM s into the epilogue just before it, state updates and the
  output after the GEMMs they need (a cell with no recurrent GEMM is one scan).
"""

from __future__ import annotations

from collections import defaultdict

import sympy

from cellgen.ir.plan import (
    OUT,
    PRE,
    PRE_PREV,
    UNIT,
    X,
    X_PREV,
    BiasBlock,
    Epilogue,
    FusedPlan,
    HoistedGemm,
    Loop,
    Operand,
    RecurrentGemm,
    Store,
    WeightBlock,
    hyper_name,
    new_state_array,
    param_arrays,
    state_array,
)
from cellgen.frontend.spec import CellSpec, Linear, SpecError

def delay_states(spec: CellSpec) -> tuple[str, ...]:
    """States whose update is exactly the input: their value at step t is x_{t-1}."""
    return tuple(name for name, expr, _ in spec.updates if expr == spec.input.symbol)


class _Analysis:
    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.delays = delay_states(spec)
        if len(self.delays) > 1:
            line = next(ln for name, _, ln in spec.updates if name == self.delays[1])
            raise SpecError(spec.path, line, f"update of {self.delays[1]}",
                            f"states {', '.join(self.delays)} are all x_(t-1); keep one delay state")
        self.delay_symbols = {spec.state(n).symbol for n in self.delays}
        self.linear_of = {g: lin for lin in spec.linears for g in lin.gates}
        self.param_arrays = param_arrays([*(p.name for p in spec.params),
                                          *(lin.bias for lin in spec.linears if lin.bias is not None)])
        self.avail_cache: dict[sympy.Expr, int] = {}
        self.linear_stage: dict[str, int | None] = {}
        self.live = self._live_linears()
        for lin in self._topological(spec.linears):
            stages = [self.avail(op) for op in self._recurrent_operands(lin)]
            self.linear_stage[lin.kernel] = max(stages) if stages else None

    # -- facts -----------------------------------------------------------------------
    def is_hoistable(self, operand: sympy.Expr) -> bool:
        """An operand is hoisted when it is x itself or a delay state (x_{t-1})."""
        return operand == self.spec.input.symbol or operand in self.delay_symbols

    def _recurrent_operands(self, lin: Linear) -> list[sympy.Expr]:
        return [op for op in lin.operands if not self.is_hoistable(op)]

    def avail(self, expr: sympy.Expr) -> int:
        """How many recurrent GEMMs must finish in this step before ``expr`` is computable."""
        levels = [0]
        for s in expr.free_symbols:
            lin = self.linear_of.get(s)
            if lin is not None and self.linear_stage[lin.kernel] is not None:
                levels.append(self.linear_stage[lin.kernel] + 1)
        return max(levels)

    def _topological(self, linears: tuple[Linear, ...]) -> list[Linear]:
        done: list[Linear] = []
        seen: set[str] = set()

        def visit(lin: Linear) -> None:
            if lin.kernel in seen:
                return
            seen.add(lin.kernel)
            for op in lin.operands:
                for s in op.free_symbols:
                    if s in self.linear_of:
                        visit(self.linear_of[s])
            done.append(lin)

        for lin in linears:
            visit(lin)
        return done

    def _live_linears(self) -> tuple[Linear, ...]:
        """The linears whose gates the updates and the output need (transitively), in spec order.

        A linear nothing reads computes nothing: its parameters stay (param_shapes, TF names)
        but it gets no GEMM columns, no loads and no epilogue work.
        """
        needed = set().union(*(expr.free_symbols for _, expr, _ in self.spec.updates), self.spec.output.free_symbols)
        live: set[str] = set()
        pending = [s for s in needed if s in self.linear_of]
        while pending:
            lin = self.linear_of[pending.pop()]
            if lin.kernel in live:
                continue
            live.add(lin.kernel)
            pending += [s for op in lin.operands for s in op.free_symbols if s in self.linear_of]
        return tuple(lin for lin in self.spec.linears if lin.kernel in live)

    # -- the hoisted GEMM ------------------------------------------------------------
    def hoisted_gemm(self) -> tuple[HoistedGemm | None, dict[str, sympy.Expr], dict[str, sympy.Expr]]:
        """Columns: direct blocks of every linear reading x, then delayed blocks (x_{t-1})."""
        isize = self.spec.input.size
        direct: dict[str, sympy.Expr] = {}
        delayed: dict[str, sympy.Expr] = {}
        blocks: list[WeightBlock] = []
        biases: list[BiasBlock] = []
        col = sympy.Integer(0)
        for want_delay, table in ((False, direct), (True, delayed)):
            for lin in self.live:
                parts = [(k, op) for k, op in enumerate(lin.operands)
                         if self.is_hoistable(op) and (op in self.delay_symbols) == want_delay]
                if not parts:
                    continue
                table[lin.kernel] = col
                for k, _ in parts:
                    blocks.append(WeightBlock(lin.kernel, _row_start(lin, k), isize, sympy.Integer(0), col,
                                              lin.columns, delayed=want_delay))
                if lin.bias is not None and (not want_delay or lin.kernel not in direct):
                    biases.append(BiasBlock(lin.bias, col, lin.columns))
                col = col + lin.columns
        if not blocks:
            return None, direct, delayed
        gemm = HoistedGemm(isize, col, tuple(blocks), tuple(biases), tuple(direct), tuple(delayed))
        return gemm, direct, delayed

    # -- the recurrent GEMMs ---------------------------------------------------------
    def recurrent_gemms(self) -> tuple[list[RecurrentGemm], dict[tuple[str, int], sympy.Expr]]:
        """One GEMM per stage; returns them and each (linear, stage)'s column offset."""
        by_stage: dict[int, list[Linear]] = defaultdict(list)
        for lin in self.live:
            for s in sorted({self.avail(op) for op in self._recurrent_operands(lin)}):
                by_stage[s].append(lin)
        gemms: list[RecurrentGemm] = []
        columns: dict[tuple[str, int], sympy.Expr] = {}
        for stage in sorted(by_stage):
            operands: list[Operand] = []
            offsets: dict[sympy.Expr, sympy.Expr] = {}
            row = sympy.Integer(0)
            for lin in by_stage[stage]:
                for op, size in zip(lin.operands, lin.operand_sizes, strict=True):
                    if self.is_hoistable(op) or self.avail(op) != stage or op in offsets:
                        continue
                    offsets[op] = row
                    operands.append(Operand(str(op), op, size, row))
                    row = row + size
            blocks: list[WeightBlock] = []
            col = sympy.Integer(0)
            for lin in by_stage[stage]:
                columns[(lin.kernel, stage)] = col
                for k, op in enumerate(lin.operands):
                    if not self.is_hoistable(op) and self.avail(op) == stage:
                        blocks.append(WeightBlock(lin.kernel, _row_start(lin, k), lin.operand_sizes[k],
                                                  offsets[op], col, lin.columns))
                col = col + lin.columns
            states = {s.symbol: s.name for s in self.spec.states}
            direct = states.get(operands[0].expr) if len(operands) == 1 else None
            gemms.append(RecurrentGemm(stage, tuple(operands), row, col, tuple(blocks),
                                       tuple(lin.kernel for lin in by_stage[stage]), direct))
        return gemms, columns

    # -- epilogues -------------------------------------------------------------------
    def loads(self, direct: dict[str, sympy.Expr], delayed: dict[str, sympy.Expr],
              rec_cols: dict[tuple[str, int], sympy.Expr]) -> dict[sympy.Symbol, sympy.Expr]:
        """Each spec symbol -> the array reads that give its value at unit ``UNIT``."""
        spec, j = self.spec, UNIT
        table: dict[sympy.Symbol, sympy.Expr] = {}
        for lin in self.live:
            for g, gate in enumerate(lin.gates):
                offset = g * lin.gate_size + j
                terms = []
                if lin.kernel in direct:
                    terms.append(_at(PRE, direct[lin.kernel] + offset))
                if lin.kernel in delayed:
                    terms.append(_at(PRE_PREV, delayed[lin.kernel] + offset))
                for (kernel, stage), col in rec_cols.items():
                    if kernel == lin.kernel:
                        terms.append(_at(f"rec{stage}", col + offset))
                if lin.bias is not None and lin.kernel not in direct and lin.kernel not in delayed:
                    terms.append(_at(self.param_arrays[lin.bias], offset))
                table[gate] = sympy.Add(*terms)
        return table | leaf_loads(spec, self.delays, self.param_arrays)

    def epilogues(self, gemms: list[RecurrentGemm], loads: dict[sympy.Symbol, sympy.Expr]) -> list[Epilogue]:
        n = len(gemms)
        stores: dict[int, list[tuple[sympy.Expr, Store]]] = defaultdict(list)

        def place(avail: int) -> int:
            return max(avail, 1) if n else 0

        for gemm in gemms:
            if gemm.operand_buffer is None:
                continue
            for op in gemm.operands:
                value = op.expr.xreplace(loads)
                target = _at(gemm.operand_buffer, op.offset + UNIT)
                stores[gemm.stage].append((op.size, Store(target, value, None)))
        for name, expr, _ in self.spec.updates:
            if name in self.delays:
                continue
            size = self.spec.state(name).size
            store = Store(_at(new_state_array(name), UNIT), expr.xreplace(loads), _at(state_array(name), UNIT))
            stores[place(self.avail(expr))].append((size, store))
        out = self.spec.output
        out_size = self.spec.size_of(out)
        stores[place(self.avail(out))].append((out_size, Store(_at(OUT, UNIT), out.xreplace(loads),
                                                               sympy.Integer(0))))
        epilogues = []
        for index in sorted(stores):
            by_domain: dict[sympy.Expr, list[Store]] = defaultdict(list)
            for size, store in stores[index]:
                by_domain[size].append(store)
            loops = tuple(Loop(size, (), tuple(sts)) for size, sts in by_domain.items())
            epilogues.append(Epilogue(index, loops))
        return epilogues


def leaf_loads(spec: CellSpec, delays: tuple[str, ...], param_arrays: dict[str, str]) -> dict[sympy.Symbol, sympy.Expr]:
    """Each state, parameter, the input and each hyperparameter -> its read in a forward epilogue at
    unit ``UNIT`` (the gates' reads are the plan's ``gate_loads``)."""
    j = UNIT
    table: dict[sympy.Symbol, sympy.Expr] = {}
    for s in spec.states:
        table[s.symbol] = _at(X_PREV if s.name in delays else state_array(s.name), j)
    for p in spec.params:
        table[p.symbol] = _at(param_arrays[p.name], j)
    table[spec.input.symbol] = _at(X, j)
    for h in spec.hypers:  # a hyperparameter is a scalar kernel argument in its own namespace
        table[h.symbol] = sympy.Symbol(hyper_name(h.name), real=True)
    return table


def linear_order(spec: CellSpec) -> list[Linear]:
    """The linears in dependency order (a linear after those whose gates its operands use)."""
    return _Analysis(spec)._topological(spec.linears)


def _at(array: str, index: sympy.Expr) -> sympy.Indexed:
    return sympy.Indexed(sympy.IndexedBase(array), index)


def _row_start(lin: Linear, k: int) -> sympy.Expr:
    return sympy.Add(*lin.operand_sizes[:k])


def analyse(spec: CellSpec) -> FusedPlan:
    """Split, hoist, fuse and schedule: the plan before passes (no CSE yet)."""
    a = _Analysis(spec)
    hoisted, direct, delayed = a.hoisted_gemm()
    gemms, rec_cols = a.recurrent_gemms()
    loads = a.loads(direct, delayed, rec_cols)
    epilogues = a.epilogues(gemms, loads)
    arrays: set[str] = set()
    for epi in epilogues:
        for loop in epi.loops:
            for store in loop.stores:
                for e in (store.value, store.target, store.masked):
                    if e is not None:
                        arrays.update(str(i.base) for i in e.atoms(sympy.Indexed))
    unit_params = tuple(p.name for p in spec.params if a.param_arrays[p.name] in arrays)
    epilogue_biases = tuple(lin.bias for lin in spec.linears
                            if lin.bias is not None and a.param_arrays[lin.bias] in arrays)
    per_unit = {a.param_arrays[n] for n in (*unit_params, *epilogue_biases)}
    batched = tuple(sorted(arrays - per_unit))
    return FusedPlan(
        spec=spec, hoisted=hoisted, gemms=tuple(gemms), epilogues=tuple(epilogues),
        recurrent_states=tuple(s.name for s in spec.states if s.name not in a.delays),
        delay_states=a.delays, batched_arrays=batched, unit_params=unit_params,
        epilogue_biases=epilogue_biases, uses_x=X in arrays, uses_x_prev=X_PREV in arrays,
        output_size=spec.size_of(spec.output), param_arrays=a.param_arrays,
        double_buffered=tuple(s.name for s in spec.states if s.name not in a.delays),  # every store: sn_
        gate_loads=tuple((str(g), loads[g]) for lin in a.live for g in lin.gates),
    )
