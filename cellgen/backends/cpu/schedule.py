"""The CPU backend's schedule (FusedPlan -> CpuSchedule): every decision its kernels encode.

Python decides here, on the plan, how the time loop runs on the CPU and what each compiled
function takes; ``templates/cpu/`` only prints it. Three modes (docs/performance.md):

* ``steps``: a cell with recurrent GEMMs. Each step runs the plan's phases (GEMM s, epilogue
  k) in order; thread q of nth takes its column panels of each GEMM and its batch rows of each
  epilogue and meets the others at a barrier after each phase, or (``by_rows``, chosen per call)
  its own batch rows through whole phases with no barrier. With a hoisted GEMM that reads the
  inputs at t only, each thread may compute its rows of it one block of steps ahead
  (``hoisted_in_steps``; ``blocked``, chosen per call).
* ``scan``: no recurrent GEMM and no double-buffered state: each thread scans its batch rows
  (the driver computed the hoisted GEMM, if any, up front).
* ``fused_scan``: a scan with a hoisted GEMM: each thread projects its own rows into a ring of
  time slots, a block of steps at a time, and scans them while they are in cache. A one-row
  call splits by units instead when the plan allows it (:class:`UnitSplit`).

Every parameter list is derived from the IR (:func:`cellgen.codegen.uses.kernel_names`): a
function takes exactly the kernel variables its code uses (each argument of a parallel function
costs Numba's parfor lowering ~35 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import sympy

from cellgen.codegen.uses import kernel_names, loop_exprs
from cellgen.codegen.printing import print_index
from cellgen.ir.plan import (
    OUT,
    PRE,
    PRE_PREV,
    UNIT,
    X,
    FusedPlan,
    hyper_name,
    new_state_array,
    saved_array,
    size_name,
    state_array,
)

#: Plan arrays the CPU kernels read through a per-step view. The output is written batch-major,
#: ``out[b, t, j]`` (a per-step view ``out[:, t]`` would be non-contiguous and not vectorize).
CPU_ARRAYS = {PRE: "pre_t", X: "x_t"}
CPU_ROWS = {OUT: "b, t"}
#: dtypes whose kernels call the rational tanh (float64 keeps libm's math.tanh).
FAST_TANH_DTYPES = ("float32",)
#: The number of time steps of a call (``T`` in the kernels).
STEPS = sympy.Symbol("T", integer=True, positive=True)


class Mode(str, Enum):
    STEPS = "steps"
    SCAN = "scan"
    FUSED_SCAN = "fused_scan"


@dataclass(frozen=True)
class Arg:
    """A kernel parameter ``name`` and what the host driver passes for it (``value``)."""

    name: str
    value: str


@dataclass(frozen=True)
class View:
    """A per-step view a kernel makes at each step: ``line`` binds ``name`` from ``reads``."""

    name: str
    line: str
    reads: tuple[str, ...]


@dataclass(frozen=True)
class Buffer:
    """A [B, width] step buffer the driver allocates (a GEMM's result or operand)."""

    name: str
    width: str


@dataclass(frozen=True)
class DoubleBuffer:
    """A state stored into ``new`` while ``old`` is still read; swapped after each step."""

    old: str
    new: str


@dataclass(frozen=True)
class GemmPhase:
    """``result = operand @ weight`` (packed panels) in a step."""

    stage: int
    operand: str
    weight: str
    result: str


@dataclass(frozen=True)
class EpiloguePhase:
    """Epilogue ``index`` of a step, a helper ``_epilogue<index>_<dtype>(b0, b1, *params)``."""

    index: int
    params: tuple[str, ...]


@dataclass(frozen=True)
class UnitSplit:
    """How a one-row fused scan splits among threads by units (the same panels of every gate).

    Each thread scans compact copies of its units: ``scan_args`` is what it passes for each of
    the scan's parameters, ``states`` the state arrays it copies, ``first`` the delayed first
    step's projection it cuts (or None); ``size`` the unit count's kernel variable.
    """

    size: str
    domain: sympy.Symbol  # the size whose units are split
    scan_args: tuple[str, ...]
    states: tuple[str, ...]
    first: str | None


@dataclass(frozen=True)
class CpuSchedule:
    """The CPU kernels of one plan: mode, arguments, buffers, phases and each function's parameters."""

    mode: Mode
    args: tuple[Arg, ...]  # the time loop's arguments, in order (the driver passes ``value``)
    views: tuple[View, ...]
    buffers: tuple[Buffer, ...]
    double_buffered: tuple[DoubleBuffer, ...]
    finals: tuple[str, ...]  # each recurrent state's final value (a double buffer's parity)
    phases: tuple[GemmPhase | EpiloguePhase, ...]
    hoisted_in_steps: bool
    pre: str | None  # the hoisted GEMM's pre: "ring" (fused scan), "blocks" (steps: per call), "whole", None
    pre_first: bool  # the delayed first step's projection pre0 = x0 @ w_in (a delay state's hoisted part)
    step_params: tuple[str, ...]  # ``_steps``: after (q, nth, sync)
    scan_params: tuple[str, ...]  # ``_scan``: after (b0, b1, s0, s1)
    thread_params: tuple[str, ...]  # each thread of the parallel region, after (q, nth)
    flags: tuple[str, ...]  # the per-call choices the driver passes last (chunk, blocked, by_rows)
    unit_split: UnitSplit | None
    delay_index: int | None  # the delay state (x_{t-1}) in STATE order
    step_work: sympy.Expr  # multiply-adds per batch row the thread count is chosen from


def _mode(plan: FusedPlan) -> Mode:
    if not (plan.scan_only and not plan.double_buffered):
        return Mode.STEPS
    return Mode.FUSED_SCAN if plan.hoisted is not None else Mode.SCAN


def _args(plan: FusedPlan) -> list[Arg]:
    spec, hoisted = plan.spec, plan.hoisted
    args: list[Arg] = []
    if hoisted is not None:
        args.append(Arg(PRE, "pre"))
        if hoisted.delayed:
            args.append(Arg("pre0", "pre0"))
    if plan.uses_x or plan.uses_x_prev or hoisted is not None:  # the hoisted GEMM reads xs too
        args.append(Arg("xs", "xs"))
    if plan.uses_x_prev:
        args.append(Arg("x0", "x0"))
    if hoisted is not None:
        args += [Arg("w_in", "w_in"), Arg("b_in", "b_in")]
    args.append(Arg("lengths", "lengths"))
    args += [Arg(f"w_rec{g.stage}", f"w_rec[{g.stage}]") for g in plan.gemms]  # packed panels
    args += [Arg(plan.param_arrays[n], f"params[{n!r}]") for n in (*plan.unit_params, *plan.epilogue_biases)]
    args += [Arg(hyper_name(h.name), f"dtype.type(hyper[{h.name!r}])") for h in spec.hypers]
    args += [Arg(size_name(str(s)), f"sizes[{str(s)!r}]") for s in spec.all_sizes]
    order = [s.name for s in spec.states]
    args += [Arg(state_array(n), f"np.array(states[{order.index(n)}], order='C')") for n in plan.recurrent_states]
    args.append(Arg(OUT, "out"))
    args += [Arg(saved_array(n), saved_array(n)) for n, _ in plan.time_loop.saved]  # a training forward's saves
    return args


def _reordered_xs(args: list[Arg], plan: FusedPlan) -> list[Arg]:
    """The argument order kernels have always had: xs right after pre/pre0 when a loop reads the
    inputs, else after x0's place (before w_in) when only the hoisted GEMM reads them."""
    if plan.uses_x or plan.uses_x_prev:
        return args
    xs = next(a for a in args if a.name == "xs") if any(a.name == "xs" for a in args) else None
    if xs is None:
        return args
    rest = [a for a in args if a.name != "xs"]
    at = next(k for k, a in enumerate(rest) if a.name == "w_in")
    return [*rest[:at], xs, *rest[at:]]


def _views(plan: FusedPlan, ring: bool) -> list[View]:
    views: list[View] = []
    if plan.hoisted is not None:
        if ring:  # pre: a ring of time slots
            views.append(View("pre_t", "pre_t = pre[t % pre.shape[0]]", ("pre",)))
            if plan.hoisted.delayed:
                views.append(View(PRE_PREV, "pre_prev = pre0 if t == 0 else pre[(t - 1) % pre.shape[0]]",
                                  ("pre0", "pre")))
        else:  # pre: the block of steps s0.. (all T steps when computed up front)
            views.append(View("pre_t", "pre_t = pre[t - s0]", ("pre",)))
            if plan.hoisted.delayed:  # never blocked: the driver computes it up front
                views.append(View(PRE_PREV, "pre_prev = pre0 if t == 0 else pre[t - s0 - 1]", ("pre0", "pre")))
    if plan.uses_x:
        views.append(View("x_t", "x_t = xs[t]", ("xs",)))
    if plan.uses_x_prev:
        views.append(View("x_prev", "x_prev = x0 if t == 0 else xs[t - 1]", ("x0", "xs")))
    return views


def _in_order(candidates: list[str], used: set[str]) -> tuple[str, ...]:
    """The ``used`` names among ``candidates``, in candidate order, each once."""
    return tuple(dict.fromkeys(n for n in candidates if n in used))


def _phases(plan: FusedPlan, candidates: list[str]) -> list[GemmPhase | EpiloguePhase]:
    phases: list[GemmPhase | EpiloguePhase] = []
    by_index = {e.index: e for e in plan.epilogues}
    for kind, index in plan.schedule():
        if kind == "gemm":
            g = plan.gemms[index]
            operand = state_array(g.direct_state) if g.direct_state else g.operand_buffer
            phases.append(GemmPhase(index, operand, f"w_rec{index}", g.result))
        else:
            used = kernel_names(plan, by_index[index].loops, CPU_ARRAYS) | {"t", "lengths"}
            phases.append(EpiloguePhase(index, _in_order(["t", "lengths", *candidates], used)))
    return phases


def _unit_domain(plan: FusedPlan) -> sympy.Symbol | None:
    """The one size D every loop of a fused scan runs over, when its units can be split.

    They can when every loop runs over the same D units (a size symbol), every hoisted block
    starts and ends on a multiple of D, and the loops read the hoisted columns only at
    ``j + g * D`` (unit j of gate g): then unit j of every gate lies in column panels its
    thread projects itself.
    """
    hoisted = plan.hoisted
    loops = [loop for e in plan.epilogues for loop in e.loops]
    domains = {loop.domain for loop in loops}
    if len(domains) != 1 or hoisted is None:
        return None
    (domain,) = domains
    if not isinstance(domain, sympy.Symbol):
        return None

    def per_gate(e: sympy.Expr) -> bool:
        return e == 0 or bool(sympy.simplify(e / domain).is_Integer)

    if not all(per_gate(e) for b in hoisted.blocks for e in (b.dest_col, b.width)):
        return None
    reads = (i for loop in loops for x in loop_exprs(loop) for i in x.atoms(sympy.Indexed))
    if not all(per_gate(i.indices[-1] - UNIT) for i in reads if str(i.base) in (PRE, PRE_PREV)):
        return None
    return domain


def _unit_split(plan: FusedPlan, scan_params: tuple[str, ...]) -> UnitSplit | None:
    """How a one-row fused scan splits by units (:func:`_unit_domain`), or None when it cannot:
    what each thread passes for each scan parameter (its compact copies, its units' slices)."""
    domain = _unit_domain(plan)
    if domain is None:
        return None
    units = size_name(str(domain))
    states = {state_array(n) for n in plan.recurrent_states}
    unit_params = {plan.param_arrays[n] for n in plan.unit_params}
    fixed = {PRE: "ring", "pre0": "first", units: "units", OUT: "out_q"}
    passed = {"T", "lengths", *(size_name(str(s)) for s in plan.spec.all_sizes)}
    args: list[str] = []
    for name in scan_params:
        if name in fixed:
            args.append(fixed[name])
        elif name in states:
            args.append(f"{name}_q")
        elif name in unit_params:
            args.append(f"{name}[j0:j1]")
        elif name in passed:
            args.append(name)
        else:  # an array the split does not know how to cut
            return None
    copies = tuple(n for n in scan_params if n in states)
    return UnitSplit(units, domain, tuple(args), copies, "pre0" if "pre0" in scan_params else None)


def _pre(plan: FusedPlan, mode: Mode) -> str | None:
    """Where the hoisted GEMM's result lives: a fused scan's ring of time slots, a step loop's
    block of steps (each thread its rows, just before the steps read them; the driver decides per
    call whether blocks pay, else ``whole``), or all T steps computed up front by the driver.
    A delayed hoisted GEMM (pre_prev) is never blocked."""
    if plan.hoisted is None:
        return None
    if mode is Mode.FUSED_SCAN:
        return "ring"
    return "blocks" if mode is Mode.STEPS and not plan.hoisted.delayed else "whole"


def cpu_schedule(plan: FusedPlan) -> CpuSchedule:
    """Decide the CPU kernels of ``plan`` (see the module docstring)."""
    mode = _mode(plan)
    args = _reordered_xs(_args(plan), plan)
    views = _views(plan, ring=mode is Mode.FUSED_SCAN)
    view_reads = {r for v in views for r in v.reads}
    buffers = []
    for g in plan.gemms:  # a GEMM result spans whole packed panels
        buffers.append(Buffer(g.result, f"w_rec{g.stage}.shape[0] * w_rec{g.stage}.shape[2]"))
        if g.operand_buffer is not None:
            buffers.append(Buffer(g.operand_buffer, print_index(g.rows)))
    double_buffered = tuple(DoubleBuffer(state_array(n), new_state_array(n)) for n in plan.double_buffered)
    # a double-buffered state's final value is in its old array after an even number of steps
    finals = tuple(f"{state_array(n)} if T % 2 == 0 else {new_state_array(n)}" if n in plan.double_buffered
                   else state_array(n) for n in plan.recurrent_states)
    # what a thread of the loop may work on: the kernel's arguments and step buffers
    step_args = [a.name for a in args] + [b.name for b in buffers] + [d.new for d in double_buffered]
    phases = _phases(plan, step_args + [v.name for v in views])
    hoisted_in_steps = plan.hoisted is not None and mode is Mode.STEPS

    loops = [loop for e in plan.epilogues for loop in e.loops]
    scan_used = kernel_names(plan, loops, CPU_ARRAYS) | view_reads
    scan_params = _in_order(["T", "lengths", *step_args], scan_used | {"T", "lengths"})
    step_used = view_reads | {OUT, "b_zero", "gemm_fn", "by_rows"}
    step_used |= {n for d in double_buffered for n in (d.old, d.new)}
    if hoisted_in_steps:
        step_used |= {PRE, "xs", "w_in", "b_in", "blocked"}
    for phase in phases:
        step_used |= set(phase.params) if isinstance(phase, EpiloguePhase) else \
            {phase.operand, phase.weight, phase.result}
    step_params = _in_order([*step_args, "b_zero", "gemm_fn", *(["blocked"] if hoisted_in_steps else []),
                             "by_rows"], step_used)

    if mode is Mode.FUSED_SCAN:
        thread_params = ("chunk", *scan_params,
                         *(n for n in ("xs", "w_in", "b_in", "gemm_fn") if n not in scan_params))
        flags = ("chunk",)
    elif mode is Mode.SCAN:
        thread_params, flags = scan_params, ()
    else:
        thread_params = ("sync", *step_params)
        flags = ("blocked", "by_rows") if hoisted_in_steps else ("by_rows",)

    order = [s.name for s in plan.spec.states]
    work: sympy.Expr
    if mode is not Mode.STEPS:  # a scan's whole call per row: T steps of its units (rows are split)
        work = STEPS * plan.output_size
    elif plan.gemms:  # a step loop's multiply-adds per row and step
        work = sum((g.rows * g.width for g in plan.gemms), sympy.Integer(0))
    else:
        work = plan.output_size
    return CpuSchedule(
        mode=mode, args=tuple(args), views=tuple(views), buffers=tuple(buffers),
        double_buffered=double_buffered, finals=finals, phases=tuple(phases), hoisted_in_steps=hoisted_in_steps,
        pre=_pre(plan, mode), pre_first=plan.hoisted is not None and plan.hoisted.delayed,
        step_params=step_params, scan_params=scan_params, thread_params=tuple(thread_params), flags=flags,
        unit_split=_unit_split(plan, scan_params) if mode is Mode.FUSED_SCAN else None,
        delay_index=order.index(plan.delay_states[0]) if plan.delay_states else None,
        step_work=work,
    )
