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
from cellgen.ir.backward import (
    D_OUT,
    D_PRE,
    D_PRE_PREV,
    D_X,
    D_X_PREV,
    X_ALL,
    X_ALL_PREV,
    TrainingPlan,
    adjoint_state_array,
    d_gates_array,
    d_operand_array,
    operand_rows_array,
    param_adjoint_array,
)
from cellgen.ir.plan import hyper_name, saved_array, size_name


def _rows(tp: TrainingPlan) -> dict[str, str]:
    """How each [T, B, n] (or [B, T, n]) array of the backward kernels is indexed at step t."""
    now = "t + 1, b" if tp.delayed else "t, b"  # the arrays with x_{-1} first have T + 1 rows
    rows = {sv.array: "t, b" for sv in tp.saved}
    rows |= {d_gates_array(s): "t, b" for s in tp.stages} | {operand_rows_array(s): "t, b" for s in tp.stages}
    rows |= {D_OUT: "b, t", D_PRE: now, D_PRE_PREV: "t, b", X_ALL: now, X_ALL_PREV: "t, b", D_X: now,
             D_X_PREV: "t, b"}
    return rows


def _ordered(names: set[str], order: list[str]) -> list[str]:
    missing = sorted(names - set(order))
    assert not missing, f"cellgen bug: backward kernel variables with no host value: {missing}"
    return [n for n in order if n in names]


def backward_context(tp: TrainingPlan) -> dict[str, Any]:
    """Everything ``templates/cpu/backward.py.j2`` needs (under the CPU context's ``backward``)."""
    plan, spec = tp.backward, tp.backward.spec
    rows = _rows(tp)
    recurrent = list(plan.recurrent_states)
    # every kernel variable the host can pass, in the order the thread function takes them
    order = ["lengths", D_OUT, *(adjoint_state_array(n) for n in recurrent), *(sv.array for sv in tp.saved)]
    order += [X_ALL, X_ALL_PREV, D_PRE, D_PRE_PREV, D_X, D_X_PREV]
    for s in tp.stages:
        order += [d_gates_array(s), d_operand_array(s), f"w_rect{s}", operand_rows_array(s)]
    order += [param_adjoint_array(n) for n in tp.unit_params]
    order += [plan.param_arrays[n] for n in plan.param_arrays]
    order += [hyper_name(h.name) for h in spec.hypers] + [size_name(str(s)) for s in spec.all_sizes]
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
                              "params": ["t", *_ordered(names | {"lengths"}, order)],
                              "loops": [kp.loop(loop) for loop in loops]})
        kernels.append({"dtype": dtype, "schedule": items, "thread": f"_backward_steps_{dtype}"})
    step_params = _ordered(used, order)
    if tp.stages:
        step_params += ["b_zero", "gemm_fn"]
    step_params.append("by_rows")

    x_width = print_index(spec.input.size)
    hoisted = plan.hoisted
    work = sum((g.rows * g.width for g in plan.gemms), sympy.Integer(0)) if plan.gemms else plan.output_size
    return {
        "kernels": kernels,
        "step_params": step_params,
        "thread_params": ["sync", "T", *step_params],
        "states": [{"name": adjoint_state_array(n), "index": k} for k, n in enumerate(recurrent)],
        "state_order": [{"delay": s.name in plan.delay_states,
                         "name": adjoint_state_array(s.name) if s.name not in plan.delay_states else None}
                        for s in spec.states],
        "delay_index": next((k for k, s in enumerate(spec.states) if s.name in plan.delay_states), None),
        "saved": [sv.array for sv in tp.saved],
        "delayed": tp.delayed,
        "x_all": X_ALL in used or X_ALL_PREV in used or hoisted is not None,
        "x_width": x_width,
        "writes_x": D_X in used or D_X_PREV in used,
        "hoisted": None if hoisted is None else {"width": print_index(hoisted.width)},
        "stages": [{"stage": s, "width": print_index(plan.gemms[k].width), "rows": print_index(plan.gemms[k].rows),
                    "operand_rows": saved_array(plan.gemms[k].direct_state) if plan.gemms[k].direct_state
                    else operand_rows_array(s), "stored_rows": plan.gemms[k].direct_state is None}
                   for k, s in enumerate(tp.stages)],
        "unit_params": [{"name": n, "array": param_adjoint_array(n),
                         "size": print_index(next(p.size for p in spec.params if p.name == n))}
                        for n in tp.unit_params],
        "param_arrays": [{"name": n, "array": a} for n, a in plan.param_arrays.items() if a in used],
        "hypers": [{"name": h.name, "array": hyper_name(h.name)} for h in spec.hypers if hyper_name(h.name) in used],
        "sizes": [{"name": str(s), "array": size_name(str(s))} for s in spec.all_sizes],
        "biases": [{"bias": b.bias, "array": b.array, "cols": f"{print_index(b.col)}:{print_index(b.col + b.width)}"}
                   for b in tp.bias_grads],
        "work": print_index(work),
        "alias": {D_PRE_PREV: D_PRE, X_ALL_PREV: X_ALL, D_X_PREV: D_X},
    }
