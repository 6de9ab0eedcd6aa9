"""Stage 4c, facts (TrainingPlan -> BackwardLayout): the GPU backward's launches, decided in Python.

The reverse step of a :class:`~cellgen.ir.backward.TrainingPlan` is ``epilogue 0 -> drec{s} =
dg{s}[t] @ W_s^T -> epilogue 1 -> ... -> epilogue n`` (``TrainingPlan.backward.schedule()``). On the
GPU it runs the way the forward's step does (docs/gpu.md, "The stage kernel"): per transposed GEMM
ONE kernel, ``backward_stage{s}``, a thread per (batch row b, operand unit j) that reduces
``dg{s}[t, b, :]`` (the G*D gate columns) against column j of ``W_s^T`` into its accumulator and
then runs the epilogue that reads ``drec{s}[b, j]`` from that accumulator; the last kernel of a step
also runs epilogue 0 of the *next* reverse step, t - 1 (its inputs are the state adjoints this
thread has just written), so a step is one launch per stage and the gate adjoints ``dg{s}[t]`` are
written once, read once, by the next step's GEMM. Epilogue 0 of the first step (t = T - 1) is
launched alone before the loop.

Fusing a part into a kernel is decided on the IR (:func:`fusable`): within one kernel no thread may
read what another thread writes, since a kernel has no grid-wide barrier. So every array a part
stores into must be accessed, by every part of the kernel, at columns a thread owns (``j + c`` with
``c`` equal, or a whole multiple of the loops' common domain apart); the epilogue fed by the GEMM
must read ``drec{s}`` only at columns the thread accumulates, ``[b, m*D + j]``, in loops over D units
(an operand of M parts of D rows each, e.g. ``[h, c]``, gives a thread M accumulators; one part: M = 1,
D = the operand's width); and no part of step t may store into the GEMM's own input ``dg{s}``
(epilogue 0 of step t - 1 writes its row t - 1).
Where that fails, the GEMM is today's launch of the runtime's GEMM and the epilogue its own kernel
(``backward{k}``), so the answer is never wrong; no shipped spec needs that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from cellgen.backends.cuda.layout import BLOCK_ROWS, BLOCK_UNITS, TILE_K, StageGemm, gate_of
from cellgen.codegen.uses import kernel_names, loop_exprs
from cellgen.ir.backward import (
    D_PRE,
    D_PRE_PREV,
    D_X,
    D_X_PREV,
    X_ALL,
    X_ALL_PREV,
    TrainingPlan,
    array_rows,
    d_gates_array,
    d_operand_array,
)
from cellgen.ir.plan import UNIT, Loop, RecurrentGemm, size_name

#: The variable a kernel's part of the next reverse step (t - 1) indexes its rows with.
NEXT_STEP = "t1"


@dataclass(frozen=True)
class Part:
    """An epilogue a backward kernel runs at (b, j): of the kernel's step t (``next_step`` False) or of
    step t - 1; ``accumulator``: it reads the kernel's GEMM result ``drec{s}[b, j]`` from the register."""

    epilogue: int
    next_step: bool = False
    accumulator: bool = False


@dataclass(frozen=True)
class BackwardKernel:
    """One launch of the reverse loop: an optional transposed GEMM (``gemm``: ``result = operand @
    weight`` with ``operand = dg{s}[t]``; a thread accumulates ``gemm.gates`` columns ``m * units + j``
    of the result, one per part of the forward operand, e.g. ``[h, c]``: no interleaving, each part's
    32 columns of a weight row are one coalesced load) and the epilogue
    parts it runs from the accumulator, in order. ``stored``: the accumulator is also written to
    ``drec{s}`` for an epilogue of a later kernel. ``extents``: the unit counts its threads cover."""

    name: str
    gemm: StageGemm | None
    gates_array: str | None  # dg{s}, the GEMM's operand array ([T, B, G*D]; the kernel reads row t)
    parts: tuple[Part, ...]
    stored: bool
    args: tuple[str, ...]
    extents: tuple[sympy.Expr, ...]


@dataclass(frozen=True)
class RuntimeGemm:
    """The unfused fallback: ``drec{s} = dg{s}[t] @ W_s^T`` by the runtime's tiled GEMM."""

    stage: int


@dataclass(frozen=True)
class BackwardLayout:
    """The reverse loop's launches: ``first`` before the loop (for step T - 1), ``step`` per step; or,
    for a cell with no recurrent GEMM, ``scan``: ONE kernel for every step (the time loop inside)."""

    first: tuple[BackwardKernel, ...]
    step: tuple[BackwardKernel | RuntimeGemm, ...]
    scan: BackwardKernel | None = None

    @property
    def kernels(self) -> tuple[BackwardKernel, ...]:
        return (self.first + tuple(k for k in self.step if isinstance(k, BackwardKernel))
                + ((self.scan,) if self.scan else ()))

    @property
    def fused_stages(self) -> tuple[int, ...]:
        """The forward stages whose transposed GEMM runs fused (in a ``backward_stage{s}`` kernel)."""
        return tuple(k.gemm.stage for k in self.step if isinstance(k, BackwardKernel) and k.gemm is not None)

    @property
    def launches_per_step(self) -> int:
        return len(self.step)


# -- facts on the IR -------------------------------------------------------------------------------
def _same_array(tp: TrainingPlan) -> dict[str, str]:
    """Kernel names that are views of one device array (``dpre_prev`` of ``dpre``; ``dpre`` of the
    stage's d_gates where the host aliases them)."""
    same = {D_PRE_PREV: D_PRE, X_ALL_PREV: X_ALL, D_X_PREV: D_X}
    if tp.pre_alias is not None:
        same[D_PRE] = d_gates_array(tp.pre_alias)
        same[D_PRE_PREV] = d_gates_array(tp.pre_alias)
    return same


def _accesses(loops: tuple[Loop, ...], same: dict[str, str]) -> list[tuple[str, sympy.Expr, sympy.Expr, bool]]:
    """(device array, column index, the loop's domain, is a store) of every array access of ``loops``."""
    out = []
    for loop in loops:
        stores = {s.target for s in loop.stores}
        for expr in loop_exprs(loop):
            for i in expr.atoms(sympy.Indexed):
                base = str(i.base)
                out.append((same.get(base, base), i.indices[0], sympy.sympify(loop.domain), i in stores))
    return out


def _owned(a: tuple[sympy.Expr, sympy.Expr], b: tuple[sympy.Expr, sympy.Expr]) -> bool:
    """Columns ``a = (index, domain)`` and ``b`` touch an element only from one thread (the same j)."""
    (ia, da), (ib, db) = a, b
    ca, cb = sympy.expand(ia - UNIT), sympy.expand(ib - UNIT)
    if ca.has(UNIT) or cb.has(UNIT):
        return False
    if sympy.simplify(ca - cb) == 0:
        return True
    if sympy.simplify(da - db) != 0:
        return False
    k = sympy.simplify((ca - cb) / da)
    return bool(k.is_Integer and k != 0)


def fusable(tp: TrainingPlan, parts: list[tuple[Part, tuple[Loop, ...]]], gemm_stage: int | None,
            units: sympy.Expr | None, pieces: int = 1) -> bool:
    """Whether ``parts`` (with the GEMM of forward stage ``gemm_stage``, if any, whose result is
    ``pieces`` operand parts of ``units`` columns each) can run in one kernel without a grid barrier
    (the module docstring's rules)."""
    same = _same_array(tp)
    rows = array_rows(tp, d_out="t, b")
    accesses = [(p, a) for p, loops in parts for a in _accesses(loops, same)]
    written = {a[0] for _, a in accesses if a[3]}
    for name in written:
        cols = {(a[1], a[2]) for _, a in accesses if a[0] == name}
        if not all(_owned(x, y) for x in cols for y in cols):
            return False
    if gemm_stage is None:
        return not any(a[0].startswith("drec") and not p.accumulator for p, a in accesses
                       if p.next_step)
    dg, drec = d_gates_array(gemm_stage), d_operand_array(gemm_stage)
    for part, (name, index, domain, store) in accesses:
        if store and name == dg and (not part.next_step or any(
                rows.get(n) != "t, b" for n in (dg, D_PRE, D_PRE_PREV) if same.get(n, n) == dg)):
            return False  # the GEMM reads dg{s}[t]: only the next step's row t - 1 may be written
        if name == drec and (part.next_step or not part.accumulator or gate_of(index, units, pieces) is None
                             or sympy.simplify(domain - units) != 0):
            return False  # a thread holds columns m * units + j of drec{s} (m < pieces), in loops over units
        if part.next_step and name.startswith("drec"):
            return False  # epilogue 0 reads no operand adjoint
    return True


def operand_pieces(gemm: RecurrentGemm) -> tuple[int, sympy.Expr]:
    """(M, D): the GEMM's operand is M parts of D rows each, part m at rows ``m * D`` (one part: the
    whole operand). A backward stage kernel's thread then accumulates ``drec{s}[b, m * D + j]``."""
    sizes = {sympy.sympify(o.size) for o in gemm.operands}
    if len(gemm.operands) > 1 and len(sizes) == 1:
        d = sizes.pop()
        if all(sympy.simplify(o.offset - m * d) == 0 for m, o in enumerate(gemm.operands)) and \
                sympy.simplify(len(gemm.operands) * d - gemm.rows) == 0:
            return len(gemm.operands), d
    return 1, gemm.rows


def _reads(loops: tuple[Loop, ...], array: str) -> bool:
    return any(str(i.base) == array for loop in loops for e in loop_exprs(loop) for i in e.atoms(sympy.Indexed))


# -- the layout --------------------------------------------------------------------------------------
@dataclass
class _Draft:
    """A kernel before its arguments are known (the layout's working form)."""

    name: str
    gemm: StageGemm | None = None
    parts: list[Part] = field(default_factory=list)


def backward_layout(tp: TrainingPlan, order: list[str], fuse: bool = True) -> BackwardLayout:
    """The reverse loop's kernels (``order``: every kernel variable in argument order; ``fuse=False``
    gives the unfused launches, the fallback, for tests)."""
    plan = tp.backward
    by_index = {e.index: e.loops for e in plan.epilogues}

    def with_loops(parts: list[Part]) -> list[tuple[Part, tuple[Loop, ...]]]:
        return [(p, by_index[p.epilogue]) for p in parts]

    step: list[_Draft | RuntimeGemm] = []
    for k, g in enumerate(plan.gemms):
        stage = tp.stages[k]
        following = [Part(k + 1, accumulator=True)] if k + 1 in by_index else []
        pieces, units = operand_pieces(g)
        if fuse and fusable(tp, with_loops(following), stage, units, pieces):
            gemm = StageGemm(stage=stage, operand=f"{d_gates_array(stage)}_t", weight=f"wt{stage}",
                             result=d_operand_array(stage), rows=g.width, width=g.rows, units=units, gates=pieces,
                             stored=tuple(range(pieces)), block=(BLOCK_UNITS, BLOCK_ROWS), tile_k=TILE_K)
            step.append(_Draft(f"backward_stage{stage}", gemm, following))
        else:
            step.append(RuntimeGemm(stage))
            if following:
                step.append(_Draft(f"backward{k + 1}", parts=[Part(k + 1)]))
    first: list[_Draft] = []
    if 0 in by_index:  # epilogue 0 of step t - 1 joins the step's last kernel where it may
        last = step[-1] if step else None
        if fuse and isinstance(last, _Draft) and fusable(
                tp, with_loops([*last.parts, Part(0, next_step=True)]), last.gemm and last.gemm.stage,
                last.gemm and last.gemm.units, last.gemm.gates if last.gemm else 1):
            last.parts.append(Part(0, next_step=True))
            first.append(_Draft("backward0", parts=[Part(0)]))
        else:
            step.insert(0, _Draft("backward0", parts=[Part(0)]))
    scan = None
    if fuse and not plan.gemms and step and fusable(tp, with_loops([Part(0)]), None, None):
        # a scan-only cell (QRNN): each thread runs every step of its (b, j), as the forward's scan kernel
        scan, step = _Draft("backward_scan", parts=[Part(0)]), []
    drafts = first + [d for d in step if isinstance(d, _Draft)] + ([scan] if scan else [])

    def finished(d: _Draft) -> BackwardKernel:
        loops = tuple(loop for p in d.parts for loop in by_index[p.epilogue])
        names = kernel_names(plan, loops, {}) | {"lengths", "T" if d is scan else "t"}
        extents = [sympy.sympify(loop.domain) for loop in loops]
        stored, dg = False, None
        if d.gemm is not None:
            g = d.gemm
            dg = d_gates_array(g.stage)
            names.discard(g.result)
            # the accumulator is written out only for an epilogue of another kernel
            stored = any(_reads(tuple(by_index[p.epilogue]), g.result) for o in drafts if o is not d for p in o.parts)
            names |= {dg, g.weight, *(size_name(str(s)) for s in (g.rows + g.width).free_symbols)}
            names |= {g.result} if stored else set()
            extents.insert(0, sympy.sympify(g.units))
        args = tuple(n for n in ["t", "T", *order] if n in names)
        missing = sorted(names - set(args))
        assert not missing, f"cellgen bug: backward kernel variables with no host value: {missing}"
        return BackwardKernel(d.name, d.gemm, dg, tuple(d.parts), stored, args, tuple(dict.fromkeys(extents)))

    return BackwardLayout(tuple(finished(d) for d in first),
                          tuple(finished(d) if isinstance(d, _Draft) else d for d in step),
                          finished(scan) if scan else None)
