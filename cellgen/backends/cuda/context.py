"""Stage 4c (FusedPlan -> CUDA template context): kernels, launch geometry and the GPU's buffers.

The CUDA backend emits, from the same plan as the CPU backend (docs/gpu.md):

* ``hoisted``: ONE tiled shared-memory GEMM over all T*B rows, bias added in its epilogue;
* ``stage{s}``: per step and recurrent GEMM ``s``, ONE kernel that runs the GEMM on a
  gate-interleaved weight (the G gate columns of unit j adjacent) so that a thread owns
  unit j of one batch row with all G accumulators, and applies epilogue ``s + 1`` straight
  from them, sequence-length masking included (*fused*);
* ``scan``: a scan-only cell (QRNN) is one kernel, a thread per (row, unit), time loop inside;
* ``epilogue{k}``: an elementwise kernel, only for epilogue 0 (filling a stage-0 operand
  buffer) and for an epilogue that cannot be fused (its loops have another domain than the
  GEMM's gates, or the GEMM's gates differ in size). No shipped spec needs one.

Facts are computed on the plan (:func:`stage_layouts`, :func:`gpu_double_buffered`);
expressions are printed by :class:`CudaPrinter`; templates get strings and ints only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import sympy

from cellgen.ir.plan import (
    OUT,
    PRE,
    PRE_PREV,
    UNIT,
    X,
    X_PREV,
    Epilogue,
    FusedPlan,
    Loop,
    RecurrentGemm,
    Store,
    hyper_name,
    new_state_array,
    size_name,
    state_array,
)
from cellgen.codegen.printing import DTYPES, NumbaPrinter, print_index
from cellgen.codegen.loops import STEP_VIEWS, KernelPrinter

#: Threads of a step/scan/elementwise block: one warp along units, BLOCK_ROWS batch rows.
BLOCK_UNITS, BLOCK_ROWS = 32, 4
#: Reduction tile of a stage kernel; equal to BLOCK_UNITS so each thread loads one operand.
TILE_K = BLOCK_UNITS
#: The hoisted GEMM: GEMM_TILE x GEMM_TILE outputs per block of GEMM_THREADS^2 threads, K tile.
GEMM_TILE, GEMM_THREADS, GEMM_TILE_K = 64, 16, 16

#: Kernel arrays read through a per-step view, and the line that makes the view inside a kernel.
VIEW_LINES = {
    PRE: "pre_t = pre[t]",
    PRE_PREV: "pre_prev = pre0 if t == 0 else pre[t - 1]",
    X: "x_t = xs[t]",
    X_PREV: "x_prev = x0 if t == 0 else xs[t - 1]",
    OUT: "out_t = out[t]",
}
#: The host/kernel arguments a plan array reads.
VIEW_ARGS = {PRE: ("pre",), PRE_PREV: ("pre", "pre0"), X: ("xs",), X_PREV: ("xs", "x0"), OUT: ("out",)}


@dataclass(frozen=True)
class StageLayout:
    """How recurrent GEMM ``stage`` runs on the GPU.

    ``gates`` columns of each of ``units`` units, packed gate-interleaved (column
    ``u * gates + g`` of the packed weight is column ``g * units + u`` of the plan's).
    ``fused``: epilogue ``stage + 1`` runs in the same kernel from the accumulators.
    ``stored``: accumulators written to ``rec{stage}`` for later epilogues.
    An unfused stage has ``gates == 1`` and ``units == width`` (one column per thread).
    """

    stage: int
    gates: int
    units: sympy.Expr
    fused: bool
    stored: tuple[int, ...]

    @property
    def interleaved(self) -> bool:
        return self.gates > 1


def _loop_exprs(loop: Loop) -> list[sympy.Expr]:
    exprs = [e for _, e in loop.temps]
    for s in loop.stores:
        exprs += [s.value, s.target] + ([s.masked] if s.masked is not None else [])
    return [sympy.sympify(e) for e in exprs]


def reads(loop: Loop, array: str) -> list[sympy.Expr]:
    """The column indices at which ``loop`` reads ``array``."""
    return [i.indices[0] for e in _loop_exprs(loop) for i in e.atoms(sympy.Indexed) if str(i.base) == array]


def gate_of(index: sympy.Expr, units: sympy.Expr, gates: int) -> int | None:
    """``k`` when ``index == k * units + j`` with ``0 <= k < gates``; else None.

    >>> n = sympy.Symbol("num_units")
    >>> gate_of(UNIT + 2 * n, n, 4), gate_of(UNIT + 1, n, 4)
    (2, None)
    """
    k = sympy.simplify((index - UNIT) / units)
    if k.is_Integer and 0 <= int(k) < gates:
        return int(k)
    return None


def gate_layout(plan: FusedPlan, gemm: RecurrentGemm) -> tuple[int, sympy.Expr] | None:
    """(gates G, units D) when every gate of the GEMM's linears has the same size D; else None."""
    linears = [lin for lin in plan.spec.linears if lin.kernel in gemm.linears]
    sizes = {lin.gate_size for lin in linears}
    if len(sizes) != 1:
        return None
    units = sizes.pop()
    gates = sum(len(lin.gates) for lin in linears)
    if sympy.simplify(gates * units - gemm.width) != 0:
        return None
    return gates, units


def stage_layouts(plan: FusedPlan) -> tuple[StageLayout, ...]:
    """One :class:`StageLayout` per recurrent GEMM: fuse its epilogue where the gates allow."""
    by_index = {e.index: e for e in plan.epilogues}
    layouts = []
    for gemm in plan.gemms:
        result, following = gemm.result, by_index.get(gemm.stage + 1)
        found = gate_layout(plan, gemm)
        fused = found is not None and (following is None or all(
            loop.domain == found[1] and all(gate_of(i, found[1], found[0]) is not None for i in reads(loop, result))
            for loop in following.loops))
        later = [(loop.domain, i) for e in plan.epilogues if e.index > gemm.stage + 1 or not fused
                 for loop in e.loops for i in reads(loop, result)]
        if not fused or found is None:
            layouts.append(StageLayout(gemm.stage, 1, gemm.width, False, (0,) if later else ()))
            continue
        gates, units = found
        ks = {gate_of(i, units, gates) if domain == units else None for domain, i in later}
        stored = tuple(range(gates)) if None in ks else tuple(sorted(ks))
        layouts.append(StageLayout(gemm.stage, gates, units, True, stored))
    return tuple(layouts)


def gpu_double_buffered(plan: FusedPlan, layouts: tuple[StageLayout, ...]) -> tuple[str, ...]:
    """States the GPU double-buffers: the plan's, plus any state a fused kernel both reads whole
    (as its GEMM operand, across all units) and stores: other blocks may still be reading it."""
    names = set(plan.double_buffered)
    by_index = {e.index: e for e in plan.epilogues}
    for gemm, layout in zip(plan.gemms, layouts, strict=True):
        following = by_index.get(gemm.stage + 1)
        if not layout.fused or gemm.direct_state is None or following is None:
            continue
        targets = {str(s.target.base) for loop in following.loops for s in loop.stores}
        if state_array(gemm.direct_state) in targets:
            names.add(gemm.direct_state)
    return tuple(n for n in plan.recurrent_states if n in names)


def double_buffer(plan: FusedPlan, names: tuple[str, ...]) -> FusedPlan:
    """Retarget in-place stores of ``names`` to ``s_<name>_new`` (rows past their length copy the old value)."""
    old = {state_array(n): new_state_array(n) for n in names}

    def store(s: Store) -> Store:
        base = str(s.target.base)
        if base not in old:
            return s
        index = s.target.indices[0]
        return Store(sympy.Indexed(sympy.IndexedBase(old[base]), index), s.value, s.target)

    epilogues = tuple(Epilogue(e.index, tuple(dataclasses.replace(loop, stores=tuple(map(store, loop.stores)))
                                              for loop in e.loops)) for e in plan.epilogues)
    batched = tuple(sorted(set(plan.batched_arrays) | {new_state_array(n) for n in names}))
    return dataclasses.replace(plan, epilogues=epilogues, batched_arrays=batched, double_buffered=names)


class CudaPrinter(NumbaPrinter):
    """:class:`NumbaPrinter` for kernels: a fused GEMM's result is read from its accumulators.

    ``accumulators`` maps a result array (``rec0``) to (units, accumulator names by gate).
    """

    def __init__(self, dtype: str, batched: tuple[str, ...],
                 accumulators: dict[str, tuple[sympy.Expr, tuple[str, ...]]] | None = None) -> None:
        super().__init__(dtype, batched, row="b", arrays=STEP_VIEWS)
        self.accumulators = accumulators or {}

    def _print_Indexed(self, expr: sympy.Indexed) -> str:
        found = self.accumulators.get(str(expr.base))
        if found is None:
            return super()._print_Indexed(expr)
        units, names = found
        k = gate_of(expr.indices[0], units, len(names))
        if k is None:
            raise ValueError(f"{expr} is not a gate column of {expr.base}")
        return names[k]


class CudaKernelPrinter(KernelPrinter):
    """The CPU's loop printer with a :class:`CudaPrinter` (same statements, accumulator reads)."""

    def __init__(self, plan: FusedPlan, dtype: str,
                 accumulators: dict[str, tuple[sympy.Expr, tuple[str, ...]]] | None = None) -> None:
        self.plan = plan
        self.printer = CudaPrinter(dtype, plan.batched_arrays, accumulators)


# -- arguments ---------------------------------------------------------------------------------
def _arg_order(plan: FusedPlan) -> list[tuple[str, str]]:
    """Every kernel argument as (name, kind); kinds: int, real, lengths, array1..3."""
    spec = plan.spec
    args: list[tuple[str, str]] = [("t", "int"), ("pre", "array3"), ("pre0", "array2"), ("xs", "array3"),
                                   ("x0", "array2"), ("lengths", "lengths")]
    args += [(f"w_rec{g.stage}", "array2") for g in plan.gemms]
    args += [(g.result, "array2") for g in plan.gemms]
    args += [(g.operand_buffer, "array2") for g in plan.gemms if g.operand_buffer is not None]
    args += [(plan.param_arrays[n], "array1") for n in (*plan.unit_params, *plan.epilogue_biases)]
    args += [(hyper_name(h.name), "real") for h in spec.hypers]
    args += [(size_name(str(s)), "int") for s in spec.all_sizes]
    args += [(state_array(n), "array2") for n in plan.recurrent_states]
    args += [(new_state_array(n), "array2") for n in plan.recurrent_states]
    args.append(("out", "array3"))
    return args


def _used(exprs: list[sympy.Expr]) -> set[str]:
    """Argument names an expression list needs: arrays (through their views) and scalars.

    Hyperparameters are already their kernel variables in the plan (``hy_...``); sizes are
    the spec's size symbols (integer), printed as their kernel variables (``n_...``).
    """
    names: set[str] = set()
    for e in exprs:
        e = sympy.sympify(e)
        for i in e.atoms(sympy.Indexed):
            names.update(VIEW_ARGS.get(str(i.base), (str(i.base),)))
            names.update(_sizes_used(*i.indices))
        names.update(size_name(str(s)) if s.is_integer else str(s) for s in e.free_symbols
                     if not isinstance(s, sympy.Indexed) and s != UNIT)
    return names


def _loops_used(loops: tuple[Loop, ...] | list[Loop]) -> set[str]:
    return _used([e for loop in loops for e in (*_loop_exprs(loop), loop.domain)])


def _views(loops) -> str:
    """The view lines (``pre_t = pre[t]``) for the plan arrays ``loops`` touch."""
    arrays = {str(i.base) for loop in loops for e in _loop_exprs(loop) for i in e.atoms(sympy.Indexed)}
    return "\n".join(line for name, line in VIEW_LINES.items() if name in arrays)


# -- kernels -----------------------------------------------------------------------------------
def _loops_text(kp: KernelPrinter, loops, guard_domains: bool) -> tuple[str, str]:
    """(body, masked body) of loops at one (row b, unit j); guarded by ``j < domain`` when asked."""
    body, masked = [], []
    for loop in loops:
        for text, out in ((kp.loop(loop), body), (kp.masked_loop(loop), masked)):
            if text is None:
                continue
            if guard_domains:
                out.append(f"if j < {text.domain}:\n" + _indent(text.body))
            else:
                out.append(text.body)
    return "\n".join(body), "\n".join(masked)


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line if line else line for line in text.splitlines())


def _domain_max(domains) -> str:
    """Host expression for the largest loop domain (the x extent of an elementwise grid)."""
    texts = list(dict.fromkeys(print_index(d) for d in domains))
    return texts[0] if len(texts) == 1 else f"max({', '.join(texts)})"


def _sizes_used(*exprs: sympy.Expr) -> set[str]:
    """The kernel variables of the sizes in index or size expressions."""
    return {size_name(str(s)) for e in exprs for s in sympy.sympify(e).free_symbols if s != UNIT}


class _Kernels:
    """Builds every kernel's context for one plan (after the GPU's double-buffering)."""

    def __init__(self, plan: FusedPlan) -> None:
        self.layouts = stage_layouts(plan)
        self.double_buffered = gpu_double_buffered(plan, self.layouts)
        self.plan = double_buffer(plan, self.double_buffered)
        self.order = _arg_order(self.plan)
        self.by_index = {e.index: e for e in self.plan.epilogues}

    def args(self, names: set[str]) -> list[str]:
        return [n for n, _ in self.order if n in names]

    def kinds(self, names: set[str]) -> list[list[str]]:
        return [[n, k] for n, k in self.order if n in names]

    def stage(self, gemm: RecurrentGemm, layout: StageLayout, dtype: str) -> dict[str, Any]:
        """GEMM ``gemm.stage`` (+ its epilogue when fused) as one kernel."""
        accs = tuple(f"_acc{g}" for g in range(layout.gates))
        loops = self.by_index[gemm.stage + 1].loops if layout.fused and gemm.stage + 1 in self.by_index else ()
        kp = CudaKernelPrinter(self.plan, dtype, {gemm.result: (layout.units, accs)})
        body, masked = _loops_text(kp, loops, guard_domains=False)
        plain = NumbaPrinter(dtype, self.plan.batched_arrays, row="b")
        stores = [{"target": plain.doprint(sympy.Indexed(sympy.IndexedBase(gemm.result), k * layout.units + UNIT)),
                   "acc": accs[k]} for k in layout.stored]
        operand = state_array(gemm.direct_state) if gemm.direct_state else gemm.operand_buffer
        used = {"t", "lengths", operand, f"w_rec{gemm.stage}"} | _loops_used(loops)
        used |= _sizes_used(gemm.rows, gemm.width, layout.units)
        if stores:
            used.add(gemm.result)
        else:  # read from the accumulators only
            used.discard(gemm.result)
        return {
            "name": f"stage{gemm.stage}", "stage": gemm.stage, "args": self.args(used), "kinds": self.kinds(used),
            "operand": operand, "weight": f"w_rec{gemm.stage}", "rows": print_index(gemm.rows),
            "width": print_index(gemm.width), "units": print_index(layout.units), "gates": layout.gates,
            "accs": list(accs), "stores": stores, "views": _views(loops), "body": body, "masked": masked,
            "fused": layout.fused, "epilogue": gemm.stage + 1 if loops else None,
        }

    def elementwise(self, index: int, dtype: str, scan: bool) -> dict[str, Any]:
        """Epilogue ``index`` as one kernel, a thread per (row, unit): per step, or the whole scan."""
        epi = self.by_index[index]
        kp = CudaKernelPrinter(self.plan, dtype)
        body, masked = _loops_text(kp, epi.loops, guard_domains=True)
        used = {"lengths"} | _loops_used(epi.loops)
        if scan:  # the time loop runs to out.shape[0]
            used = (used - {"t"}) | {"out"}
        else:
            used.add("t")
        copies = []
        if scan:  # a thread's double-buffered states: new -> old after each step
            for name in self.double_buffered:
                domain = next(loop.domain for loop in epi.loops for s in loop.stores
                              if str(s.target.base) == new_state_array(name))
                copies.append({"domain": print_index(domain), "old": state_array(name),
                               "new": new_state_array(name)})
        return {
            "name": "scan" if scan else f"epilogue{index}", "index": index, "args": self.args(used),
            "kinds": self.kinds(used), "views": _views(epi.loops), "body": body, "masked": masked,
            "domain": _domain_max(loop.domain for loop in epi.loops), "copies": copies,
        }

    def for_dtype(self, dtype: str) -> dict[str, Any]:
        plan = self.plan
        kernels: dict[str, Any] = {"dtype": dtype, "np_dtype": DTYPES[dtype],
                                   "zero": NumbaPrinter(dtype).doprint(sympy.Integer(0))}
        if plan.scan_only:
            kernels["scan"] = self.elementwise(0, dtype, scan=True)
            kernels["steps"] = []
            return kernels
        steps = []
        for kind, index in plan.schedule():
            if kind == "gemm":
                steps.append({"kind": "stage", **self.stage(plan.gemms[index], self.layouts[index], dtype)})
            elif index == 0 or not self.layouts[index - 1].fused:
                steps.append({"kind": "elementwise", **self.elementwise(index, dtype, scan=False)})
        kernels["steps"] = steps
        kernels["scan"] = None
        return kernels


def context(plan: FusedPlan) -> dict[str, Any]:
    """Everything ``templates/cuda.py.j2`` needs, as plain strings, ints and lists of them."""
    k = _Kernels(plan)
    gpu = k.plan
    state_names = [s.name for s in plan.spec.states]
    buffers = []
    for g, layout in zip(gpu.gemms, k.layouts, strict=True):
        if layout.stored:
            buffers.append({"name": g.result, "width": print_index(g.width)})
        if g.operand_buffer is not None:
            buffers.append({"name": g.operand_buffer, "width": print_index(g.rows)})
    delay_index = state_names.index(plan.delay_states[0]) if plan.delay_states else None
    return {
        "block": [BLOCK_UNITS, BLOCK_ROWS], "tile_k": TILE_K,
        "gemm_tile": GEMM_TILE, "gemm_threads": GEMM_THREADS, "gemm_tile_k": GEMM_TILE_K,
        "gemm_per_thread": GEMM_TILE // GEMM_THREADS,
        "kernels": [k.for_dtype(dtype) for dtype in DTYPES],
        "scan": gpu.scan_only,
        "layouts": [{"stage": lay.stage, "gates": lay.gates, "units": print_index(lay.units),
                     "interleaved": lay.interleaved} for lay in k.layouts],
        "recurrent_states": [{"array": state_array(n), "index": state_names.index(n)} for n in gpu.recurrent_states],
        "double_buffered": [{"old": state_array(n), "new": new_state_array(n)} for n in k.double_buffered],
        "buffers": buffers,
        "unit_params": [{"array": gpu.param_arrays[n], "name": n} for n in (*gpu.unit_params, *gpu.epilogue_biases)],
        "hypers": [{"name": h.name, "kernel": hyper_name(h.name)} for h in plan.spec.hypers],
        "delay_index": delay_index,
        "delayed": bool(plan.hoisted is not None and plan.hoisted.delayed),
        "output_size": print_index(plan.output_size),
    }
