"""The CUDA backend's backward (TrainingPlan -> template context of ``templates/cuda/backward.py.j2``).

The same reverse loop as the CPU's, as launches: per step, each backward epilogue is one kernel
(a thread per (row b, unit j), every loop of the epilogue guarded by its domain) and each
transposed GEMM ``drec{s} = dg{s}[t] @ W_s^T`` one launch of the runtime's tiled GEMM
(:mod:`cellgen.backends.cuda.gemm`); after the loop, the weight gradients (``a^T @ b`` over all
T*B rows), the column sums and the inputs' adjoint are launches of the same GEMM. The outputs'
adjoint is time-major on the device (``dout[t, b, j]``).
"""

from __future__ import annotations

from typing import Any

import sympy

from cellgen.backends.cuda.layout import BLOCK_ROWS, BLOCK_UNITS
from cellgen.codegen.loops import KernelPrinter
from cellgen.codegen.printing import DTYPES, NumbaPrinter, print_index
from cellgen.codegen.training import host_context, in_order, kernel_order
from cellgen.codegen.uses import kernel_names
from cellgen.ir.backward import TrainingPlan, array_rows, d_gates_array, d_operand_array


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line if line else line for line in text.splitlines())


def backward_context(tp: TrainingPlan) -> dict[str, Any]:
    """Everything ``templates/cuda/backward.py.j2`` needs (under the CUDA context's ``backward``)."""
    plan = tp.backward
    rows = array_rows(tp, d_out="t, b")
    order = kernel_order(tp, weight="wt{stage}")
    by_index = {e.index: e for e in plan.epilogues}
    used: set[str] = {"lengths"}
    launches, dtypes = [], []
    for kind, index in plan.schedule():
        if kind == "gemm":
            s = tp.stages[index]
            launches.append({"kind": "gemm", "stage": s, "operand": f"{d_gates_array(s)}[t]", "weight": f"wt{s}",
                             "result": d_operand_array(s)})
            used |= {d_gates_array(s), d_operand_array(s)}
        else:
            loops = by_index[index].loops
            names = kernel_names(plan, loops, {}) | {"lengths"}
            used |= names
            extents = list(dict.fromkeys(print_index(loop.domain) for loop in loops))
            launches.append({"kind": "epilogue", "name": f"backward{index}", "index": index,
                             "args": ["t", *in_order(names, order)], "block": [BLOCK_UNITS, BLOCK_ROWS],
                             "grid": [extents[0] if len(extents) == 1 else f"max({', '.join(extents)})", "B"],
                             "kinds": [["t", "int"], *([n, _kind(n)] for n in in_order(names, order))]})
    for dtype in DTYPES:
        kp = KernelPrinter(plan, dtype, fast_tanh=None, arrays={}, rows=rows)
        kernels = []
        for launch in launches:
            if launch["kind"] != "epilogue":
                continue
            loops = by_index[launch["index"]].loops
            texts = [kp.loop(loop) for loop in loops]
            if len(texts) == 1:  # one loop: its unit guard joins the row's
                guard, body = f" and j < {texts[0].domain}", texts[0].body
            else:
                guard, body = "", "\n".join(f"if j < {t.domain}:\n" + _indent(t.body) for t in texts)
            kernels.append({"name": launch["name"], "args": launch["args"], "body": body, "guard": guard})
        dtypes.append({"dtype": dtype, "zero": NumbaPrinter(dtype).doprint(sympy.Integer(0)), "kernels": kernels})
    return {**host_context(tp, used), "dtypes": dtypes, "launches": launches,
            "epilogues": [a for a in launches if a["kind"] == "epilogue"]}


def _kind(name: str) -> str:
    """A backward kernel argument's kind (``_CUDA_ARGS``): scalars by namespace, arrays by rank."""
    if name.startswith(("hy_",)):
        return "real"
    if name.startswith("n_"):
        return "int"
    if name == "lengths":
        return "lengths"
    if name.startswith("p_"):
        return "array1"
    if name.startswith(("ds_", "drec", "dp_")):
        return "array2"
    return "array3"
