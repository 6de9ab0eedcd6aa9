"""Stage 4d (TrainingPlan -> template values): what every backend's backward host code needs.

The arrays a backward allocates and how it reads them back are the same on every backend (the
CPU's NumPy arrays, the GPU's device arrays): the adjoint states, the saved values, the inputs with
x_{-1} first, ``dpre``, the d_gates and operand rows of each stage, the per-unit parameters'
accumulators, and the bias and weight gradients after the loop. This module prints them once.
"""

from __future__ import annotations

from typing import Any

import sympy

from cellgen.codegen.printing import print_index
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


def kernel_order(tp: TrainingPlan, weight: str = "w_rect{stage}") -> list[str]:
    """Every backward kernel variable the host can pass, in the order kernels take them."""
    plan, spec = tp.backward, tp.backward.spec
    order = ["lengths", D_OUT, *(adjoint_state_array(n) for n in plan.recurrent_states),
             *(sv.array for sv in tp.saved), X_ALL, X_ALL_PREV, D_PRE, D_PRE_PREV, D_X, D_X_PREV]
    for s in tp.stages:
        order += [d_gates_array(s), d_operand_array(s), weight.format(stage=s), operand_rows_array(s)]
    order += [param_adjoint_array(n) for n in tp.unit_params]
    order += list(plan.param_arrays.values())
    order += [hyper_name(h.name) for h in spec.hypers] + [size_name(str(s)) for s in spec.all_sizes]
    return order


def in_order(names: set[str], order: list[str]) -> list[str]:
    """``names`` in kernel order; every kernel variable must have a host value."""
    missing = sorted(names - set(order))
    assert not missing, f"cellgen bug: backward kernel variables with no host value: {missing}"
    return [n for n in order if n in names]


def host_context(tp: TrainingPlan, used: set[str]) -> dict[str, Any]:
    """The backward host code's arrays (``used``: the kernel variables some kernel reads)."""
    plan, spec = tp.backward, tp.backward.spec
    by_stage = {tp.stages[k]: g for k, g in enumerate(plan.gemms)}
    return {
        "used": sorted(used),
        "states": [{"name": adjoint_state_array(n), "index": k} for k, n in enumerate(plan.recurrent_states)],
        "state_order": [{"delay": s.name in plan.delay_states,
                         "name": None if s.name in plan.delay_states else adjoint_state_array(s.name)}
                        for s in spec.states],
        "delay_index": next((k for k, s in enumerate(spec.states) if s.name in plan.delay_states), None),
        "saved": [sv.array for sv in tp.saved],
        "delayed": tp.delayed,
        "x_all": bool(used & {X_ALL, X_ALL_PREV}) or plan.hoisted is not None,
        "x_width": print_index(spec.input.size),
        "writes_x": bool(used & {D_X, D_X_PREV}),
        "hoisted": None if plan.hoisted is None else {"width": print_index(plan.hoisted.width),
                                                       "alias": None if tp.pre_alias is None
                                                       else d_gates_array(tp.pre_alias)},
        "stages": [{"stage": s, "width": print_index(by_stage[s].width), "rows": print_index(by_stage[s].rows),
                    "operand_rows": saved_array(by_stage[s].direct_state) if by_stage[s].direct_state
                    else operand_rows_array(s), "stored_rows": by_stage[s].direct_state is None}
                   for s in tp.stages],
        "unit_params": [{"name": n, "array": param_adjoint_array(n),
                         "size": print_index(next(p.size for p in spec.params if p.name == n))}
                        for n in tp.unit_params],
        "param_arrays": [{"name": n, "array": a} for n, a in plan.param_arrays.items() if a in used],
        "hypers": [{"name": h.name, "array": hyper_name(h.name)} for h in spec.hypers if hyper_name(h.name) in used],
        "sizes": [{"name": str(s), "array": size_name(str(s))} for s in spec.all_sizes
                  if size_name(str(s)) in used or s in _host_sizes(tp)],
        "biases": [{"bias": b.bias, "array": b.array, "width": print_index(b.width),
                    "cols": f"{print_index(b.col)}:{print_index(b.col + b.width)}"} for b in tp.bias_grads],
    }


def _host_sizes(tp: TrainingPlan) -> set:
    """The size symbols the backward host code prints (array shapes, column slices)."""
    plan, spec = tp.backward, tp.backward.spec
    exprs = [*(g.width for g in plan.gemms), *(g.rows for g in plan.gemms)]
    exprs += [p.size for p in spec.params if p.name in tp.unit_params]
    exprs += [e for b in tp.bias_grads for e in (b.col, b.width)]
    if plan.hoisted is not None:
        exprs.append(plan.hoisted.width)
    return set().union(*(sympy.sympify(e).free_symbols for e in exprs))
