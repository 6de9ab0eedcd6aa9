"""The CPU backend's backward (TrainingPlan -> template context of ``templates/cpu/backward.py.j2``).

The reverse time loop runs like the forward's step loop (docs/performance.md): one parallel
region per call; thread q of nth takes its column panels of each transposed GEMM and its batch
rows of each backward epilogue and meets the others at a barrier after each phase, or
(``by_rows``) runs its own rows through whole phases with no barrier; a cell with no recurrent
GEMM (a scan) always splits by rows. The weight gradients and the inputs' adjoint are NumPy
GEMMs over all T*B rows after the loop.
"""

from __future__ import annotations

from typing import Any

import sympy

from cellgen.backends.cpu.schedule import FAST_TANH_DTYPES
from cellgen.codegen.loops import KernelPrinter
from cellgen.codegen.printing import DTYPES, print_index
from cellgen.codegen.uses import kernel_names
from cellgen.codegen.training import host_context, in_order, kernel_order
from cellgen.ir.backward import TrainingPlan, array_rows, d_gates_array, d_operand_array


def backward_context(tp: TrainingPlan) -> dict[str, Any]:
    """Everything ``templates/cpu/backward.py.j2`` needs (under the CPU context's ``backward``)."""
    plan = tp.backward
    rows = array_rows(tp)
    order = kernel_order(tp)
    by_index = {e.index: e for e in plan.epilogues}
    kernels = []
    used: set[str] = {"lengths"}
    for dtype in DTYPES:
        tanh = f"_tanh_{dtype}" if dtype in FAST_TANH_DTYPES else None
        kp = KernelPrinter(plan, dtype, fast_tanh=tanh, arrays={}, rows=rows)
        items = []
        for kind, index in plan.schedule():
            if kind == "gemm":
                s = tp.stages[index]
                items.append({"kind": "gemm", "operand": f"{d_gates_array(s)}[t]", "weight": f"w_rect{s}",
                              "result": d_operand_array(s)})
                used |= {d_gates_array(s), f"w_rect{s}", d_operand_array(s)}
            else:
                loops = by_index[index].loops
                names = kernel_names(plan, loops, {})
                used |= names
                items.append({"kind": "epilogue", "helper": f"_backward{index}_{dtype}",
                              "params": ["t", *in_order(names | {"lengths"}, order)],
                              "loops": [kp.loop(loop) for loop in loops]})
        kernels.append({"dtype": dtype, "schedule": items, "thread": f"_backward_steps_{dtype}"})
    step_params = in_order(used, order)
    if tp.stages:
        step_params += ["b_zero", "gemm_fn"]
    step_params.append("by_rows")

    work = sum((g.rows * g.width for g in plan.gemms), sympy.Integer(0)) if plan.gemms else plan.output_size
    return {
        **host_context(tp, used),
        "kernels": kernels,
        "step_params": step_params,
        "thread_params": ["sync", "T", *step_params],
        "work": print_index(work),
    }
