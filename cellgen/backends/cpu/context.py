"""The CPU backend's template context: :class:`~.schedule.CpuSchedule` and the loops, printed.

Python decides in :mod:`.schedule`; this module prints the schedule's expressions and each
dtype's epilogue loops into strings for ``templates/cpu/``.
"""

from __future__ import annotations

from typing import Any

import sympy

from cellgen.backends.cpu.backward import backward_context
from cellgen.backends.cpu.schedule import (
    CPU_ARRAYS,
    CPU_ROWS,
    FAST_TANH_DTYPES,
    STEPS,
    CpuSchedule,
    EpiloguePhase,
    Mode,
    cpu_schedule,
)
from cellgen.codegen.loops import KernelPrinter, LoopText
from cellgen.codegen.printing import DTYPES, NumbaPrinter, print_index, rational_tanh
from cellgen.ir.backward import training_plan
from cellgen.ir.plan import FusedPlan, Loop, saved_array, size_name



def _tanh_helper(dtype: str) -> dict[str, Any] | None:
    """The ``fast_tanh`` helper of a dtype's kernels, printed from :func:`rational_tanh`."""
    if dtype not in FAST_TANH_DTYPES:
        return None
    x = sympy.Symbol("x", real=True)
    steps, result = rational_tanh(x)
    p = NumbaPrinter(dtype)
    return {"name": f"_tanh_{dtype}", "arg": p.doprint(x),
            "lines": [f"{p.doprint(s)} = {p.doprint(e)}" for s, e in steps], "result": p.doprint(result)}


def _printed(kp: KernelPrinter, loops: list[Loop]) -> tuple[list[LoopText], list[LoopText]]:
    """Each loop as it runs for an active row, and the loops that store past a row's length."""
    return [kp.loop(loop) for loop in loops], [m for m in (kp.masked_loop(loop) for loop in loops) if m is not None]


def _kernels(plan: FusedPlan, schedule: CpuSchedule, dtype: str, ns: str = "") -> dict[str, Any]:
    tanh = _tanh_helper(dtype)
    rows = CPU_ROWS | {saved_array(n): "t, b" for n, _ in plan.time_loop.saved}  # a training forward's [T, B, n] saves
    kp = KernelPrinter(plan, dtype, fast_tanh=tanh["name"] if tanh else None, arrays=CPU_ARRAYS, rows=rows)
    by_index = {e.index: e for e in plan.epilogues}
    phases = []
    for phase in schedule.phases:
        if isinstance(phase, EpiloguePhase):
            loops, masked = _printed(kp, list(by_index[phase.index].loops))
            phases.append({"kind": "epilogue", "loops": loops, "masked_loops": masked,
                           "helper": f"_epilogue{phase.index}{ns}_{dtype}", "params": list(phase.params)})
        else:
            phases.append({"kind": "gemm", "operand": phase.operand, "weight": phase.weight,
                           "result": phase.result})
    # a scan writes its masked steps too (zero outputs), so its output needs no zeroing
    loops, masked = _printed(kp, [loop for e in plan.epilogues for loop in e.loops])
    thread = {Mode.FUSED_SCAN: "_fused_scan", Mode.SCAN: "_scan_rows", Mode.STEPS: "_steps"}[schedule.mode]
    serial = "_steps" if schedule.mode is Mode.STEPS else "_scan"
    return {"dtype": dtype, "schedule": phases, "loops": loops, "masked_loops": masked, "tanh": tanh,
            "scan": f"_scan{ns}_{dtype}", "thread": f"{thread}{ns}_{dtype}", "serial": f"{serial}{ns}_{dtype}"}


def context(plan: FusedPlan) -> dict[str, Any]:
    """Everything ``templates/cpu/kernels.py.j2`` needs (under the module context's ``cpu``):
    the forward's kernels, and under ``train`` the forward that saves and the backward."""
    training = training_plan(plan.spec)
    return {**forward_context(plan), "train": forward_context(training.forward, "_train"),
            "backward": backward_context(training)}


def forward_context(plan: FusedPlan, ns: str = "") -> dict[str, Any]:
    """A forward's kernels under the namespace ``ns`` (every function and table name ends in it)."""
    s = cpu_schedule(plan)
    split = s.unit_split
    saved = [{"name": saved_array(n), "width": print_index(w)} for n, w in plan.time_loop.saved]
    return {
        "ns": ns,
        "saved": saved,
        "mode": s.mode.value,
        "kernels": [_kernels(plan, s, dtype, ns) for dtype in DTYPES],
        "args": [a.name for a in s.args], "call_args": [a.value for a in s.args],
        "double_buffered": [{"old": d.old, "new": d.new} for d in s.double_buffered],
        "finals": list(s.finals),
        "buffers": [{"name": b.name, "width": b.width} for b in s.buffers],
        "step_views": "\n".join(v.line for v in s.views),
        "step_hoisted": s.hoisted_in_steps,
        "step_params": list(s.step_params), "scan_params": list(s.scan_params),
        "thread_params": list(s.thread_params), "flags": list(s.flags),
        "units": None if split is None else {"size": split.size, "scan_args": list(split.scan_args),
                                              "states": list(split.states), "first": split.first},
        "delay_index": s.delay_index, "pre": s.pre, "pre_first": s.pre_first,
        "output_size": print_index(plan.output_size),
        # the sizes _run_cpu itself computes with (the kernels get theirs from ``call_args``)
        "driver_sizes": [f"{size_name(str(n))} = sizes[{str(n)!r}]" for n in plan.spec.all_sizes
                         if n in (sympy.sympify(s.step_work).free_symbols | plan.output_size.free_symbols
                                  | ({split.domain} if split is not None else set())
                                  | _saved_sizes(plan))],
        "step_work": print_index(s.step_work, {STEPS: "T"}),
    }


def _saved_sizes(plan: FusedPlan) -> set[sympy.Symbol]:
    return set().union(*(sympy.sympify(w).free_symbols for _, w in plan.time_loop.saved))
