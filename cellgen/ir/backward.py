"""Stage 2b (CellSpec -> TrainingPlan): the forward that saves, and the fused backward plan.

The backward of a fused step is fused the same way, reversed (docs/training.md):

* the forward saves, every step, what the backward reads (:func:`saved_values`): each
  activation (a sigmoid, tanh or exp of the step's values) the adjoints read, which makes the
  backward's derivatives products (``s*(1 - s)``, ``1 - t**2``) instead of transcendentals, and
  each recurrent state's value before the step and each live gate's value (its linear's result)
  that the adjoints still read once the activations are substituted: ``sv_<name>[t, b, j]``
  (:func:`with_saves`);
* ONE reverse time loop runs, per step, the backward epilogues and the transposed recurrent
  GEMMs, stages in reverse order: epilogue n (the gates the updates and the output read last),
  ``drec{n-1} = dg{n-1}[t] @ W_{n-1}^T``, epilogue n-1, ..., ``drec0 = dg0[t] @ W_0^T``,
  epilogue 0 (the states' adjoints, carried in place in ``ds_<state>``). A gate's adjoint is
  stored where its value was read: ``dg{s}[t]`` for each recurrent stage s of its linear and
  ``dpre`` for its hoisted columns (the delayed ones one step earlier);
* after the loop, ONE GEMM per weight over all T*B rows (``operands^T @ d_gates``: the saved
  states, or the operand rows the backward stores in ``op{s}``), bias = column sums, and the
  inputs' adjoint ONE GEMM ``dpre @ W_hoisted^T``.

The backward plan is a :class:`FusedPlan` with a REVERSE time loop: its gemms are the DGATES_WT
products in the order they run, its epilogues the loops between them, so the printers and
``FusedPlan.schedule`` serve it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from dataclasses import dataclass

import sympy

from cellgen.frontend.dsl import sigmoid
from cellgen.frontend.spec import CellSpec, Linear
from cellgen.ir.adjoint import StepAdjoint, derive
from cellgen.ir.analysis import analyse, leaf_loads
from cellgen.ir.passes import eliminate_common_subexpressions, run_passes, stabilise
from cellgen.ir.plan import (
    PRE,
    PRE_PREV,
    UNIT,
    Direction,
    Epilogue,
    FusedPlan,
    GemmKind,
    Loop,
    Store,
    TimeLoop,
    hyper_name,
    new_state_array,
    saved_array,
    state_array,
)

#: Backward kernel arrays: the outputs' adjoint [B, T, out], the hoisted columns' adjoint
#: [T(+1), B, width] (read as dpre at a step's own row and dpre_prev one row earlier), the
#: inputs [T(+1), B, in] with x_{-1} first where there is a delay state (x at t, x_prev at t-1),
#: and the elementwise part of the inputs' adjoint in the same layout.
D_OUT, D_PRE, D_PRE_PREV, X_ALL, X_ALL_PREV, D_X, D_X_PREV = (
    "dout", "dpre", "dpre_prev", "xa", "xa_prev", "dxa", "dxa_prev")


def adjoint_state_array(name: str) -> str:
    """The [B, size] adjoint of a recurrent state, carried backwards through the steps."""
    return f"ds_{name}"


def d_gates_array(stage: int) -> str:
    """[T, B, width] d_gates of the forward's recurrent GEMM ``stage`` (its columns)."""
    return f"dg{stage}"


def d_operand_array(stage: int) -> str:
    """[B, rows] result of the transposed GEMM of forward stage ``stage``: its operands' adjoints."""
    return f"drec{stage}"


def operand_rows_array(stage: int) -> str:
    """[T, B, rows] the operand rows of forward stage ``stage``, stored by the backward for its weight GEMM."""
    return f"op{stage}"


def param_adjoint_array(name: str) -> str:
    """[B, size] per-row accumulator of a per-unit parameter's adjoint (summed over rows after the loop)."""
    return f"dp_{name}"


@dataclass(frozen=True)
class Saved:
    """A value the forward saves every step: ``sv_<name>[t, b, j]`` for ``j < width``."""

    name: str
    width: sympy.Expr
    kind: str  # "state" (its value before the step) | "gate" (its linear's result) | "activation"
    value: sympy.Expr | None = None  # an activation: its expression of the step's leaves (spec symbols)

    @property
    def array(self) -> str:
        return saved_array(self.name)


@dataclass(frozen=True)
class WeightGrad:
    """ONE GEMM after the loop: ``d_packed = rows^T @ d_gates`` over all T*B rows of forward stage ``stage``."""

    stage: int
    rows: str  # the operand rows: a saved state or op{stage}
    d_gates: str


@dataclass(frozen=True)
class BiasGrad:
    """``d_bias = column sums of array[..., col:col+width]`` over every row."""

    bias: str
    array: str
    col: sympy.Expr
    width: sympy.Expr


@dataclass(frozen=True)
class TrainingPlan:
    """A cell's forward that saves, and its fused backward."""

    forward: FusedPlan  # the forward plan with its saves (time_loop.saved)
    backward: FusedPlan  # REVERSE: DGATES_WT gemms and the backward epilogues between them
    saved: tuple[Saved, ...]
    stages: tuple[int, ...]  # backward gemm k is the transpose of forward gemm stages[k]
    weight_grads: tuple[WeightGrad, ...]
    bias_grads: tuple[BiasGrad, ...]
    unit_params: tuple[str, ...]  # per-unit parameters with a dp_ accumulator
    delayed: bool  # the cell has a delay state: x arrays have T+1 rows, x_{-1} first
    reads_inputs: bool  # the backward epilogues read the inputs (x or x_prev)
    writes_inputs: bool  # ... and store an elementwise part of their adjoint (dxa)
    pre_alias: int | None = None  # the stage whose d_gates array is dpre (TrainingPlan docs: _Backward.pre_alias)


def array_rows(tp: TrainingPlan, d_out: str = "b, t") -> dict[str, str]:
    """How the backward kernels index each [T, B, n] array at step t, batch row b (the printers'
    ``rows``): ``d_out`` is the outputs' adjoint layout (``"b, t"``: batch-major, ``"t, b"``: time-major)."""
    now = "t + 1, b" if tp.delayed else "t, b"  # the arrays with x_{-1} first have T + 1 rows
    rows = {sv.array: "t, b" for sv in tp.saved}
    rows |= {d_gates_array(s): "t, b" for s in tp.stages} | {operand_rows_array(s): "t, b" for s in tp.stages}
    rows |= {D_OUT: d_out, D_PRE: now, D_PRE_PREV: "t, b", X_ALL: now, X_ALL_PREV: "t, b", D_X: now,
             D_X_PREV: "t, b"}
    return rows


def live_linears(plan: FusedPlan) -> tuple[Linear, ...]:
    gates = {g for g, _ in plan.gate_loads}
    return tuple(lin for lin in plan.spec.linears if str(lin.gates[0]) in gates)


def _at(array: str, index: sympy.Expr) -> sympy.Indexed:
    return sympy.Indexed(sympy.IndexedBase(array), index)


#: The functions whose derivative is a product of their own value (``sigmoid' = s*(1 - s)``,
#: ``tanh' = 1 - t**2``, ``exp' = exp``): saved by the forward, read by the backward.
ACTIVATIONS = (sigmoid, sympy.tanh, sympy.exp)


def backward_reads(spec: CellSpec, plan: FusedPlan, adj: StepAdjoint) -> list[sympy.Expr]:
    """Every expression (of the step's leaves) a backward step evaluates: the adjoints of the gates,
    states, per-unit parameters and inputs, and the operand rows it stores for the weight GEMMs."""
    exprs = [*adj.gates.values(), *adj.states.values(), *adj.params.values(), adj.x, adj.x_prev]
    exprs += [op.expr for g in plan.gemms if g.direct_state is None for op in g.operands]
    return exprs


def forward_loads(plan: FusedPlan) -> dict[sympy.Symbol, sympy.Expr]:
    """Each leaf of a step -> its array reads in the forward's epilogues (``analyse``'s loads table)."""
    gates = {str(g): g for lin in plan.spec.linears for g in lin.gates}
    table = {gates[name]: load for name, load in plan.gate_loads}
    return table | leaf_loads(plan.spec, plan.delay_states, plan.param_arrays)


def _forward_loop_of(plan: FusedPlan, value: sympy.Expr) -> tuple[int, int] | None:
    """(epilogue, loop) of the first forward loop whose stores compute ``value`` (array reads)."""
    for k, epi in enumerate(plan.epilogues):
        for i, loop in enumerate(epi.loops):
            if any(st.value.has(value) for st in loop.stores):
                return k, i
    return None


def saved_values(plan: FusedPlan, adj: StepAdjoint) -> tuple[Saved, ...]:
    """What the forward (``plan``, before its passes) saves for the backward: the activations the
    adjoints read that a forward loop computes anyway (saved from that loop, so the forward's CSE
    computes each once), then the states and gates the adjoints still read with those substituted.
    A state whose saved rows feed a weight GEMM (``direct_state``) is always saved."""
    spec = plan.spec
    reads = backward_reads(spec, plan, adj)
    loads = forward_loads(plan)
    candidates = sorted({a for e in reads for a in e.atoms(*ACTIVATIONS)}, key=sympy.default_sort_key)
    taken = {s.name for s in spec.states} | {str(g) for lin in spec.linears for g in lin.gates}
    acts: dict[sympy.Expr, sympy.Symbol] = {}
    for act in candidates:
        if _forward_loop_of(plan, act.xreplace(loads)) is None:
            continue  # the forward never computes it: the backward recomputes it from what it saves
        name = f"act{len(acts)}"
        while name in taken:
            name += "_"
        taken.add(name)
        acts[act] = sympy.Symbol(name, real=True)
    substituted = [e.xreplace(acts) for e in reads]
    used = set().union(*(e.free_symbols for e in substituted))
    rows = {g.direct_state for g in plan.gemms if g.direct_state is not None}
    states = tuple(Saved(n, spec.state(n).size, "state") for n in plan.recurrent_states
                   if n in rows or spec.state(n).symbol in used)
    gates = {str(g): g for lin in spec.linears for g in lin.gates}
    sizes = {str(g): lin.gate_size for lin in spec.linears for g in lin.gates}
    kept = tuple(Saved(g, sizes[g], "gate") for g, _ in plan.gate_loads if gates[g] in used)
    activations = tuple(Saved(str(sym), spec.size_of(act), "activation", act) for act, sym in acts.items()
                        if sym in used)
    return states + kept + activations


def with_saves(plan: FusedPlan, saved: tuple[Saved, ...]) -> FusedPlan:
    """``plan`` (before its passes) with a store of every saved value, for active rows: a state's in
    the loop that stores its new value (a loop reads every value before it stores any), a gate's in
    the first epilogue after the GEMMs its value needs, an activation's in the first loop that
    computes it. The plan's own stores are left as they are; its passes then compute each shared
    value once (CSE), the saves' and the plan's alike."""
    loads = dict(plan.gate_loads)
    leaves = forward_loads(plan)
    epilogues = [list(e.loops) for e in plan.epilogues]
    indices = [e.index for e in plan.epilogues]
    for sv in saved:
        if sv.kind == "state":
            targets = {new_state_array(sv.name), state_array(sv.name)}
            k, i = next((k, i) for k, loops in enumerate(epilogues) for i, loop in enumerate(loops)
                        if any(str(s.target.base) in targets for s in loop.stores))
            value = _at(state_array(sv.name), UNIT)
        elif sv.kind == "activation":
            value = sv.value.xreplace(leaves)
            where = _forward_loop_of(plan, value)
            assert where is not None, f"cellgen bug: no forward loop computes the saved activation {sv.value}"
            k, i = where
        else:
            value = loads[sv.name]
            level = max([int(str(a.base)[3:]) + 1 for a in value.atoms(sympy.Indexed)
                         if str(a.base).startswith("rec")], default=0)
            k = next(k for k, index in enumerate(indices) if index >= level)
            i = next((i for i, loop in enumerate(epilogues[k]) if loop.domain == sv.width), None)
            if i is None:
                epilogues[k].append(Loop(sv.width, (), ()))
                i = len(epilogues[k]) - 1
        loop = epilogues[k][i]
        epilogues[k][i] = dataclasses.replace(loop, stores=(*loop.stores, Store(_at(sv.array, UNIT), value, None)))
    return dataclasses.replace(
        plan, epilogues=tuple(Epilogue(e.index, tuple(loops)) for e, loops in zip(plan.epilogues, epilogues,
                                                                                   strict=True)),
        time_loop=dataclasses.replace(plan.time_loop, saved=tuple((sv.name, sv.width) for sv in saved)),
        batched_arrays=tuple(sorted({*plan.batched_arrays, *(sv.array for sv in saved)})))


@functools.lru_cache(maxsize=16)
def training_plan(spec: CellSpec) -> TrainingPlan:
    """The saving forward (passes run) and the backward plan of ``spec`` (derived once per spec:
    every backend's context asks for it)."""
    plain = analyse(spec)
    adj = derive(spec, live_linears(plain), plain.delay_states[0] if plain.delay_states else None)
    saved = saved_values(plain, adj)
    forward = run_passes(with_saves(plain, saved))
    return _Backward(plain, adj, saved, forward).plan()


class _Backward:
    def __init__(self, plan: FusedPlan, adj: StepAdjoint, saved: tuple[Saved, ...], forward: FusedPlan) -> None:
        self.plan0, self.saved, self.forward = plan, saved, forward
        self.spec = plan.spec
        self.delay = plan.delay_states[0] if plan.delay_states else None
        self.adj = adj
        self.gemm_of_operand: dict[sympy.Expr, tuple[int, sympy.Expr]] = {}
        for g in plan.gemms:
            for op in g.operands:
                self.gemm_of_operand[op.expr] = (g.stage, op.offset)

    # -- where each leaf and adjoint is read in the backward kernels ------------------------
    def loads(self) -> dict[sympy.Symbol, sympy.Expr]:
        spec, adj, j = self.spec, self.adj, UNIT
        table: dict[sympy.Symbol, sympy.Expr] = {}
        gates = {str(g): g for lin in spec.linears for g in lin.gates}
        for sv in self.saved:  # an activation's key is its expression: xreplace matches it before its leaves
            key = (spec.state(sv.name).symbol if sv.kind == "state" else gates[sv.name] if sv.kind == "gate"
                   else sv.value)
            table[key] = _at(sv.array, j)
        if self.delay is not None:
            table[spec.state(self.delay).symbol] = _at(X_ALL_PREV, j)
        table[spec.input.symbol] = _at(X_ALL, j)
        for p in spec.params:
            table[p.symbol] = _at(self.plan0.param_arrays[p.name], j)
        for h in spec.hypers:
            table[h.symbol] = sympy.Symbol(hyper_name(h.name), real=True)
        table[adj.d_out] = _at(D_OUT, j)
        for name, sym in adj.d_new.items():
            table[sym] = _at(adjoint_state_array(name), j)
        for op, sym in adj.d_opnd.items():
            stage, offset = self.gemm_of_operand[op]
            table[sym] = _at(d_operand_array(stage), offset + j)
        return table

    # -- the gates' adjoints: where each is stored ------------------------------------------
    def gate_targets(self, gate: str) -> tuple[int, list[sympy.Indexed]]:
        """The gate's level (the forward epilogue its value is first complete in) and the arrays
        its adjoint goes to (at unit j): where its value was read from."""
        load = dict(self.plan0.gate_loads)[gate]
        targets, level = [], 0
        for term in sympy.Add.make_args(load):
            (index,) = term.indices
            base = str(term.base)
            if base == PRE:
                targets.append(_at(D_PRE, index))
            elif base == PRE_PREV:
                targets.append(_at(D_PRE_PREV, index))
            elif base.startswith("rec"):
                stage = int(base[3:])
                level = max(level, stage + 1)
                targets.append(_at(d_gates_array(stage), index))
        return level, targets

    def plan(self) -> TrainingPlan:
        spec, adj, plan = self.spec, self.adj, self.plan0
        loads = self.loads()
        n = len(plan.gemms)
        stores: dict[int, list[tuple[sympy.Expr, Store]]] = defaultdict(list)  # forward level -> stores
        gate_size = {str(g): lin.gate_size for lin in spec.linears for g in lin.gates}
        alias = self.pre_alias()
        for lin in live_linears(plan):
            for g in lin.gates:
                level, targets = self.gate_targets(str(g))
                value = adj.gates[g].xreplace(loads)
                if value == 0:  # a gate nothing reads: its d_gates stay zero
                    continue
                earliest = self.earliest(value, n)
                assert earliest >= level, f"cellgen bug: the adjoint of gate {g} reads a later stage's operands"
                for target in targets:
                    if alias is not None and str(target.base) == D_PRE:  # dpre is dg{alias} itself
                        continue
                    stores[earliest].append((gate_size[str(g)], Store(target, value, None)))
        state_stores = [(name, spec.state(name).size, Store(_at(adjoint_state_array(name), UNIT),
                                                             expr.xreplace(loads), None))
                        for name, expr in adj.states.items()]
        for name, expr in adj.params.items():
            acc, value = _at(param_adjoint_array(name), UNIT), expr.xreplace(loads)
            size = next(p.size for p in spec.params if p.name == name)
            stores[self.earliest(value, n)].append((size, Store(acc, acc + value, None)))
        writes_x = False
        for value, target in ((adj.x, D_X), (adj.x_prev, D_X_PREV)):
            if value != 0:
                acc, value = _at(target, UNIT), value.xreplace(loads)
                stores[self.earliest(value, n)].append((spec.input.size, Store(acc, acc + value, None)))
                writes_x = True
        weight_grads = []
        for g in plan.gemms:
            if g.direct_state is not None:
                rows = saved_array(g.direct_state)
            else:
                rows = operand_rows_array(g.stage)
                for op in g.operands:
                    value = op.expr.xreplace(loads)
                    stores[self.earliest(value, n)].append((op.size, Store(_at(rows, op.offset + UNIT), value, None)))
            weight_grads.append(WeightGrad(g.stage, rows, d_gates_array(g.stage)))
        for level, (size, store) in self.place_states(stores, state_stores, n):
            stores[level].append((size, store))
        epilogues = []
        for level in range(n, -1, -1):
            by_domain: dict[sympy.Expr, list[Store]] = defaultdict(list)
            for size, store in stores.get(level, []):
                by_domain[size].append(store)
            if by_domain:
                epilogues.append(Epilogue(n - level, tuple(Loop(size, (), tuple(sts))
                                                           for size, sts in by_domain.items())))
        stages = tuple(range(n - 1, -1, -1))
        gemms = tuple(dataclasses.replace(plan.gemms[s], kind=GemmKind.DGATES_WT) for s in stages)
        arrays: set[str] = set()
        for epi in epilogues:
            for loop in epi.loops:
                for s in loop.stores:
                    for e in (s.target, s.value):
                        arrays.update(str(i.base) for i in e.atoms(sympy.Indexed))
        reads_x = bool(arrays & {X_ALL, X_ALL_PREV})
        per_unit = {plan.param_arrays[p.name] for p in spec.params}
        backward = dataclasses.replace(
            plan, gemms=gemms, epilogues=tuple(epilogues), time_loop=TimeLoop(Direction.REVERSE, True, ()),
            batched_arrays=tuple(sorted(arrays - per_unit)), double_buffered=(),
            gate_loads=tuple((str(g), loads[g]) for lin in live_linears(plan) for g in lin.gates if g in loads),
            uses_x=False, uses_x_prev=False)
        backward = _cse(backward)
        return TrainingPlan(
            forward=self.forward, backward=backward, saved=self.saved, stages=stages,
            weight_grads=tuple(weight_grads), bias_grads=self.bias_grads(), unit_params=tuple(adj.params),
            delayed=self.delay is not None, reads_inputs=reads_x, writes_inputs=writes_x, pre_alias=alias)

    @staticmethod
    def earliest(value: sympy.Expr, n: int) -> int:
        """The first backward epilogue (its forward level: n runs first, 0 last) a store of ``value`` can
        go in: before any transposed GEMM when it reads no operand adjoint, else after the GEMM of the
        lowest stage it reads (``drec{s}`` is complete once that stage's GEMM ran, at level s). Everything
        but the states' adjoints goes there, so a step computes each value once where its inputs are
        first ready; the states' adjoints stay last (level 0): every other store reads them before the
        step, so they are updated in place after every read."""
        stages = [s for s in range(n) if any(str(a.base) == d_operand_array(s) for a in value.atoms(sympy.Indexed))]
        return min(stages, default=n)

    def place_states(self, stores: dict[int, list[tuple[sympy.Expr, Store]]],
                     state_stores: list[tuple[str, sympy.Expr, Store]], n: int
                     ) -> list[tuple[int, tuple[sympy.Expr, Store]]]:
        """Each state adjoint's level: its earliest (:meth:`earliest`) where every other store that reads
        it runs before it (an earlier epilogue) or in its own loop (same level and domain: a loop reads
        every value before it stores any), else the last epilogue (level 0), where it is updated in place
        after every read of the step."""
        def reads(store: Store, array: str) -> bool:
            return any(str(a.base) == array for a in store.value.atoms(sympy.Indexed))

        others = [(level, size, st) for level, entries in stores.items() for size, st in entries]
        level_of = {name: self.earliest(st.value, n) for name, _, st in state_stores}
        changed = True
        while changed:
            changed = False
            for name, size, _ in state_stores:
                array, level = adjoint_state_array(name), level_of[name]
                readers = [(lv, sz) for lv, sz, st in others if reads(st, array)]
                readers += [(level_of[other], sz) for other, sz, st in state_stores
                            if other != name and reads(st, array)]
                if level and any(lv < level or (lv == level and sz != size) for lv, sz in readers):
                    level_of[name], changed = 0, True
        return [(level_of[name], (size, store)) for name, size, store in state_stores]

    def pre_alias(self) -> int | None:
        """The stage whose d_gates array IS dpre: every gate read from the hoisted columns is read from
        that stage's columns at the same index and the other way round (a linear over [x, h]: basic_lstm,
        lstm), so each adjoint is stored once and the hoisted weight GEMM reads the stage's array. Not
        with a delay state: then the hoisted GEMM's rows are the T + 1 of [x_{-1}, xs], dg has T."""
        plan = self.plan0
        if plan.hoisted is None or self.delay is not None:
            return None
        for g in plan.gemms:
            same = True
            for _, load in plan.gate_loads:
                pre = {t.indices[0] for t in sympy.Add.make_args(load) if str(t.base) == PRE}
                rec = {t.indices[0] for t in sympy.Add.make_args(load) if str(t.base) == g.result}
                same &= pre == rec
            if same and sympy.simplify(plan.hoisted.width - g.width) == 0:
                return g.stage
        return None

    def bias_grads(self) -> tuple[BiasGrad, ...]:
        """Each bias's adjoint: the column sums of its linear's d_gates, wherever they are stored."""
        plan = self.plan0
        out = []
        for lin in live_linears(plan):
            if lin.bias is None:
                continue
            load = dict(plan.gate_loads)[str(lin.gates[0])]
            first = None
            for term in sympy.Add.make_args(load):
                base = str(term.base)
                array = {PRE: D_PRE, PRE_PREV: D_PRE}.get(base) or (
                    d_gates_array(int(base[3:])) if base.startswith("rec") else None)
                if array is not None:
                    first = (array, term.indices[0] - UNIT)
                    if base == PRE:
                        break
            assert first is not None, f"cellgen bug: the gates of {lin.kernel} are stored nowhere"
            out.append(BiasGrad(lin.bias, first[0], first[1], lin.columns))
        return tuple(out)


def _cse(plan: FusedPlan) -> FusedPlan:
    """One ``sympy.cse`` per backward loop (the forward's passes, on the backward's stores)."""
    return eliminate_common_subexpressions(stabilise(plan))
