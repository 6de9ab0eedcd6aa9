"""The CUDA backend's backward (TrainingPlan -> template context of ``templates/cuda/backward.py.j2``).

Every decision is :mod:`cellgen.backends.cuda.backward_layout`'s (:class:`BackwardLayout`): per
reverse step one ``backward_stage{s}`` kernel per transposed GEMM ``drec{s} = dg{s}[t] @ W_s^T``
that applies the epilogue it feeds from its accumulator (the last one also epilogue 0 of step
t - 1), elementwise ``backward{k}`` kernels and runtime GEMMs only where fusing is not possible.
This module prints the layout: expressions by the forward's printers (a fused GEMM's result
``drec{s}[b, m*D + j]`` prints as the accumulator ``_acc{m}``), sizes by ``print_index``. After the loop the
weight gradients (``a^T @ b`` over all T*B rows), the column sums and the inputs' adjoint are
launches of the runtime's GEMM (:mod:`cellgen.backends.cuda.gemm`). The outputs' adjoint is
time-major on the device (``dout[t, b, j]``).
"""

from __future__ import annotations

import re
from typing import Any

import sympy

from cellgen.backends.cuda.backward_layout import (
    NEXT_STEP,
    BackwardKernel,
    BackwardLayout,
    RuntimeGemm,
    backward_layout,
)
from cellgen.backends.cuda.layout import BLOCK_ROWS, BLOCK_UNITS, StageGemm, gate_of
from cellgen.codegen.loops import KernelPrinter
from cellgen.codegen.printing import DTYPES, NumbaPrinter, print_index
from cellgen.codegen.training import host_context, kernel_order
from cellgen.ir.backward import TrainingPlan, array_rows, d_gates_array, d_operand_array
from cellgen.ir.plan import UNIT, FusedPlan

class _AccumulatorPrinter(NumbaPrinter):
    """:class:`NumbaPrinter` for a backward stage kernel: ``drec{s}[b, m*D + j]`` is the thread's
    accumulator ``_acc{m}`` (``gemm``: the kernel's :class:`StageGemm`, None for no accumulator)."""

    def __init__(self, dtype: str, batched: tuple[str, ...], gemm: StageGemm | None, rows: dict[str, str]) -> None:
        super().__init__(dtype, batched, row="b", arrays={}, rows=rows)
        self.gemm = gemm

    def _print_Indexed(self, expr: sympy.Indexed) -> str:
        if self.gemm is None or str(expr.base) != self.gemm.result:
            return super()._print_Indexed(expr)
        m = gate_of(expr.indices[0], self.gemm.units, self.gemm.gates)
        if m is None:
            raise ValueError(f"{expr} is not a column of {expr.base} this thread accumulates")
        return accumulator(m)


class _PartPrinter(KernelPrinter):
    """The loops' printer with an :class:`_AccumulatorPrinter` (same statements)."""

    def __init__(self, plan: FusedPlan, dtype: str, gemm: StageGemm | None, rows: dict[str, str]) -> None:
        self.plan = plan
        self.printer = _AccumulatorPrinter(dtype, plan.batched_arrays, gemm, rows)


def accumulator(m: int) -> str:
    """The accumulator of a backward stage kernel's thread for part m of its operand."""
    return f"_acc{m}"


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line if line else line for line in text.splitlines())


def _extent(exprs: tuple[sympy.Expr, ...]) -> str:
    texts = list(dict.fromkeys(print_index(d) for d in exprs))
    return texts[0] if len(texts) == 1 else f"max({', '.join(texts)})"


def _next_step_rows(rows: dict[str, str]) -> dict[str, str]:
    """``rows`` of step t - 1: the step variable ``t`` (a whole word) replaced by :data:`NEXT_STEP`."""
    return {k: re.sub(r"\bt\b", NEXT_STEP, v) for k, v in rows.items()}


def _printed(tp: TrainingPlan, kernel: BackwardKernel, dtype: str) -> dict[str, Any]:
    """One backward kernel's source pieces for ``dtype``."""
    plan = tp.backward
    by_index = {e.index: e.loops for e in plan.epilogues}
    rows = array_rows(tp, d_out="t, b")
    parts = []
    for part in kernel.parts:
        kp = _PartPrinter(plan, dtype, kernel.gemm if part.accumulator else None,
                          _next_step_rows(rows) if part.next_step else rows)
        texts = [kp.loop(loop) for loop in by_index[part.epilogue]]
        step = NEXT_STEP if part.next_step else "t"
        cond = f"t > 0 and {step} < lengths[b]" if part.next_step else f"{step} < lengths[b]"
        if len(texts) == 1:  # one loop: its unit guard joins the row's
            cond, body = f"{cond} and j < {texts[0].domain}", texts[0].body
        else:
            body = "\n".join(f"if j < {t.domain}:\n" + _indent(t.body) for t in texts)
        if part.next_step:
            assert not re.search(r"\bt\b", body), f"cellgen bug: step t - 1's epilogue reads step t: {body}"
        parts.append({"epilogue": part.epilogue, "next_step": part.next_step, "cond": cond, "body": body})
    out: dict[str, Any] = {"name": kernel.name, "args": list(kernel.args), "parts": parts, "scan": "T" in kernel.args,
                           "next_step": any(p.next_step for p in kernel.parts), "gemm": None}
    g = kernel.gemm
    if g is not None:
        plain = NumbaPrinter(dtype, plan.batched_arrays, row="b")
        out["gemm"] = {"stage": g.stage, "gates": d_gates_array(g.stage), "operand": g.operand, "weight": g.weight,
                       "rows": print_index(g.rows), "units": print_index(g.units), "tile_k": g.tile_k,
                       "rows_per_thread": g.rows_per_thread, "block": list(g.block), "pieces": g.gates,
                       "per_thread": g.per_thread,
                       "accs": [{"name": accumulator(m), "offset": print_index(m * g.units) if m else None}
                                for m in range(g.gates)],
                       "stores": [{"target": plain.doprint(sympy.IndexedBase(g.result)[m * g.units + UNIT]),
                                   "acc": accumulator(m)} for m in range(g.gates)] if kernel.stored else []}
    return out


def _kind(name: str) -> str:
    """A backward kernel argument's kind (``_CUDA_ARGS``): scalars by namespace, arrays by rank."""
    if name.startswith("hy_"):
        return "real"
    if name.startswith("n_") or name in ("t", "T"):
        return "int"
    if name == "lengths":
        return "lengths"
    if name.startswith("p_"):
        return "array1"
    if name.startswith(("ds_", "drec", "dp_", "wt")):
        return "array2"
    return "array3"


def _launch(kernel: BackwardKernel) -> dict[str, Any]:
    return {"kind": "kernel", "name": kernel.name, "args": list(kernel.args), "block": [BLOCK_UNITS, BLOCK_ROWS],
            "grid": [_extent(kernel.extents), "B"], "kinds": [[n, _kind(n)] for n in kernel.args]}


def layout_of(tp: TrainingPlan, fuse: bool = True) -> BackwardLayout:
    """The backward's :class:`BackwardLayout` (the kernels' arguments in the host's order)."""
    return backward_layout(tp, kernel_order(tp, weight="wt{stage}"), fuse)


def backward_context(tp: TrainingPlan, fuse: bool = True) -> dict[str, Any]:
    """Everything ``templates/cuda/backward.py.j2`` needs (under the CUDA context's ``backward``).

    ``epilogues``: every backward kernel's launch facts (``kernels.py.j2`` prints ``_CUDA_ARGS`` and
    ``_CUDA_BLOCKS`` from them)."""
    layout = layout_of(tp, fuse)
    used: set[str] = {"lengths"}
    for kernel in layout.kernels:
        used |= set(kernel.args) - {"t", "T"}
    step = []
    for item in layout.step:
        if isinstance(item, RuntimeGemm):
            s = item.stage
            step.append({"kind": "gemm", "stage": s, "operand": f"{d_gates_array(s)}[t]", "weight": f"wt{s}",
                         "result": d_operand_array(s)})
            used |= {d_gates_array(s), d_operand_array(s)}
        else:
            step.append(_launch(item))
    dtypes = [{"dtype": dtype, "np_dtype": DTYPES[dtype], "zero": NumbaPrinter(dtype).doprint(sympy.Integer(0)),
               "kernels": [_printed(tp, k, dtype) for k in layout.kernels]} for dtype in DTYPES]
    return {**host_context(tp, used), "dtypes": dtypes, "first": [_launch(k) for k in layout.first], "launches": step,
            "scan": _launch(layout.scan) if layout.scan else None,
            "epilogues": [_launch(k) for k in layout.kernels], "step_var": NEXT_STEP,
            "runtime_stages": [i.stage for i in layout.step if isinstance(i, RuntimeGemm)]}
