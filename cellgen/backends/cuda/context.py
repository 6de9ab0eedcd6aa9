"""Stage 4c (CudaLayout -> CUDA template context): the launch layout printed, per dtype.

Every decision is :mod:`cellgen.backends.cuda.layout`'s (:class:`CudaLayout`, from the plan);
this module only prints it: expressions by :class:`CudaPrinter`, sizes by ``print_index``,
names and numbers as the template shows them. The template gets strings, ints, booleans and
lists/dicts of those; it prints structure and decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from cellgen.backends.cuda.layout import (
    BATCH,
    MMA_A_STRIDE,
    MMA_K_WORDS,
    MMA_TILE_K,
    MMA_N,
    MMA_ROWS,
    CudaKernel,
    CudaLayout,
    PersistentKernel,
    cuda_layout,
    gate_of,
)
from cellgen.backends.cuda import precision
from cellgen.backends.cuda.backward import backward_context
from cellgen.codegen.loops import STEP_VIEWS, KernelPrinter
from cellgen.ir.backward import training_plan
from cellgen.codegen.printing import DTYPES, NumbaPrinter, print_index
from cellgen.ir.plan import (
    OUT,
    PRE,
    PRE_PREV,
    UNIT,
    X,
    X_PREV,
    FusedPlan,
    hyper_name,
    new_state_array,
    saved_array,
    state_array,
)

#: The line that makes a per-step view inside a kernel, per plan array read through one.
VIEW_LINES = {
    PRE: "pre_t = pre[t]",
    PRE_PREV: "pre_prev = pre0 if t == 0 else pre[t - 1]",
    X: "x_t = xs[t]",
    X_PREV: "x_prev = x0 if t == 0 else xs[t - 1]",
    OUT: "out_t = out[t]",
}


class CudaPrinter(NumbaPrinter):
    """:class:`NumbaPrinter` for kernels: a fused GEMM's result is read from its accumulators.

    ``accumulators`` maps a result array (``rec0``) to (units, accumulator names by gate);
    ``variant`` says how the kernel's storage arrays (:data:`STORAGE_ARRAYS`) are read: widened to
    the compute dtype for a half storage dtype, as they are otherwise.
    """

    def __init__(self, dtype: str, batched: tuple[str, ...],
                 accumulators: dict[str, tuple[sympy.Expr, tuple[str, ...]]] | None = None,
                 rows: dict[str, str] | None = None, variant: Variant | None = None) -> None:
        super().__init__(dtype, batched, row="b", arrays=STEP_VIEWS, rows=rows)
        self.accumulators = accumulators or {}
        self.variant = variant or Variant(dtype)

    def _print_Indexed(self, expr: sympy.Indexed) -> str:
        found = self.accumulators.get(str(expr.base))
        if found is None:
            text = super()._print_Indexed(expr)
            return self.variant.load(text) if str(expr.base) in STORAGE_ARRAYS else text
        units, names = found
        k = gate_of(expr.indices[0], units, len(names))
        if k is None:
            raise ValueError(f"{expr} is not a gate column of {expr.base}")
        return names[k]


class CudaKernelPrinter(KernelPrinter):
    """The CPU's loop printer with a :class:`CudaPrinter` (same statements, accumulator reads; a store
    into a storage array rounded to the variant's storage dtype)."""

    def __init__(self, plan: FusedPlan, dtype: str,
                 accumulators: dict[str, tuple[sympy.Expr, tuple[str, ...]]] | None = None,
                 rows: dict[str, str] | None = None, variant: Variant | None = None) -> None:
        self.plan = plan
        self.variant = variant or Variant(dtype)
        self.printer = CudaPrinter(dtype, plan.batched_arrays, accumulators, rows, self.variant)

    def store(self, target: sympy.Indexed, value: str) -> str:
        if str(target.base) not in STORAGE_ARRAYS:
            return super().store(target, value)
        return f"{NumbaPrinter._print_Indexed(self.printer, target)} = {self.variant.store(value)}"


#: The plan arrays a kernel reads or writes in the storage dtype (the input at t and t - 1, the output):
#: with a half storage dtype every read widens to float32 and every store rounds back. Everything else a
#: kernel touches is in the compute dtype: pre-activations, recurrent states (float32 working copies),
#: operand buffers, the accumulators. The recurrent weights are storage too (read by the GEMM loops).
STORAGE_ARRAYS = frozenset({X, X_PREV, OUT})
#: The kernel arguments held in the storage dtype besides the recurrent weights (``CudaLayout.weights``).
STORAGE_ARGS = ("xs", "x0", "out")


@dataclass(frozen=True)
class Variant:
    """One per-dtype kernel variant: its storage dtype, the dtype it computes in, and how it converts.

    float32 and float64 store what they compute (no conversion). float16 loads widen by ``np.float32``
    and stores round by numba's own cast (round to nearest even); bfloat16 arrays are uint16 bit
    patterns, widened by ``_bf16_to_f32`` and rounded by ``_f32_to_bf16``
    (:func:`cellgen.backends.cuda.precision.device_functions`, bound by the module's ``_cuda_bind``).
    """

    storage: str

    @property
    def compute(self) -> str:
        return precision.compute_name(self.storage)

    @property
    def half(self) -> bool:
        return self.storage in precision.HALF

    def load(self, text: str) -> str:
        """A read of a storage element, as a compute-dtype value."""
        if self.storage == "float16":
            return f"np.float32({text})"
        if self.storage == "bfloat16":
            return f"_bf16_to_f32({text})"
        return text

    def store(self, text: str) -> str:
        """A compute-dtype value as the element a storage array holds."""
        return f"_f32_to_bf16({text})" if self.storage == "bfloat16" else text

    def bits(self, text: str) -> str:
        """A storage element's 16-bit pattern (half storage: a tensor-core operand's half register)."""
        return f"_f16_bits({text})" if self.storage == "float16" else text

    def round_bits(self, text: str) -> str:
        """A compute-dtype value rounded to the (half) storage dtype, as its 16-bit pattern."""
        return self.bits(f"np.float16({text})") if self.storage == "float16" else self.store(text)

    def rounded(self, text: str) -> str:
        """A compute-dtype value rounded to the (half) storage dtype, widened back (exact)."""
        return self.load(f"np.float16({text})" if self.storage == "float16" else self.store(text))

    @property
    def element(self) -> str:
        """The storage element's NumPy type as the kernels name it (uint16 for bfloat16's patterns)."""
        return "np.uint16" if self.storage == "bfloat16" else f"np.{self.storage}"


#: The kernel variants of a forward that computes for users: one per storage dtype.
FORWARD_VARIANTS = tuple(Variant(s) for s in precision.STORAGE)
#: The training forward's and the backward's variants (float32 and float64: no half storage there).
TRAIN_VARIANTS = tuple(Variant(s) for s in DTYPES)


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line if line else line for line in text.splitlines())


def _extent(exprs: tuple[sympy.Expr, ...]) -> str:
    """Host expression for the largest of some sizes (a grid's x extent)."""
    texts = list(dict.fromkeys(print_index(d) for d in exprs))
    return texts[0] if len(texts) == 1 else f"max({', '.join(texts)})"


def _accumulators(kernel: CudaKernel) -> tuple[str, ...]:
    return tuple(f"_acc{g}" for g in range(kernel.gemm.gates)) if kernel.gemm else ()


def _bodies(plan: FusedPlan, kernel: CudaKernel, variant: Variant) -> tuple[str, str]:
    """(body, masked body) of the kernel's loops at one (row b, unit j), for ``variant``."""
    accs = _accumulators(kernel)
    rows = {saved_array(n): "t, b" for n, _ in plan.time_loop.saved}  # a training forward's [T, B, n] saves
    kp = CudaKernelPrinter(plan, variant.compute,
                           {kernel.gemm.result: (kernel.gemm.units, accs)} if kernel.gemm else None, rows, variant)
    body, masked = [], []
    for loop in kernel.loops:
        for text, out in ((kp.loop(loop), body), (kp.masked_loop(loop), masked)):
            if text is None:
                continue
            out.append(f"if j < {text.domain}:\n" + _indent(text.body) if kernel.guarded else text.body)
    return "\n".join(body), "\n".join(masked)


def _printed(plan: FusedPlan, kernel: CudaKernel, variant: Variant, prefix: str = "") -> dict[str, Any]:
    """One kernel's source pieces for ``variant``."""
    dtype = variant.compute
    body, masked = _bodies(plan, kernel, variant)
    out: dict[str, Any] = {
        "name": prefix + kernel.name, "args": list(kernel.arg_names), "block": list(kernel.block),
        "stage": kernel.stage,
        "scan": not kernel.per_step,
        "views": [VIEW_LINES[v] for v in kernel.views], "body": body, "masked": masked,
        "runs_epilogue": kernel.runs_epilogue, "has_masked": kernel.masked, "epilogue": kernel.epilogue,
        "copies": [{"domain": print_index(c.domain), "old": c.old, "new": c.new} for c in kernel.copies],
    }
    g = kernel.gemm
    if g is not None:
        accs = _accumulators(kernel)
        plain = NumbaPrinter(dtype, plan.batched_arrays, row="b")
        out.update({
            "gemm_stage": g.stage, "operand": g.operand, "weight": g.weight,
            "rows": print_index(g.rows), "width": print_index(g.width),
            "units": print_index(g.units), "gates": g.gates, "interleaved": g.interleaved, "tile_k": g.tile_k,
            "columns": g.columns, "threads": g.threads, "weight_tile": g.weight_tile,
            "rows_per_thread": g.rows_per_thread, "per_thread": g.per_thread,
            "swizzle": g.swizzle(np.dtype(dtype).itemsize),
            "accs": [{"name": a, "column": c, "gate": k} for k, (a, c) in enumerate(zip(accs, g.acc_columns,
                                                                                         strict=True))],
            "stores": [{"target": plain.doprint(sympy.Indexed(sympy.IndexedBase(g.result), k * g.units + UNIT)),
                        "acc": accs[k]} for k in g.stored],
        })
    return out


def _launch(kernel: CudaKernel, prefix: str = "") -> dict[str, Any]:
    """How the host launches a kernel (dtype-independent)."""
    return {
        "name": prefix + kernel.name, "args": list(kernel.arg_names), "kinds": [[a.name, a.kind] for a in kernel.args],
        "block": list(kernel.block), "grid": [_extent(kernel.grid[0]), print_index(kernel.grid[1], {BATCH: "B"})],
    }


def _persistent(plan: FusedPlan, kernel: PersistentKernel, variant: Variant, prefix: str = "") -> dict[str, Any]:
    """The persistent kernel's source pieces for ``variant``: its stages printed as the stage kernels are;
    with half storage their GEMMs on tensor cores (``mma``: tiles per warp, the accumulator tile's width)."""
    stages = [_printed(plan, k, variant, prefix) for k in kernel.stages]
    if variant.half:
        for printed, k in zip(stages, kernel.stages, strict=True):
            printed["mma_tiles"] = kernel.mma_tiles(k)
    return {"name": prefix + kernel.name, "args": list(kernel.arg_names), "block": list(kernel.block),
            "stages": stages, "mma": variant.half,
            "mma_rows": MMA_ROWS, "mma_n": MMA_N, "mma_k_words": MMA_K_WORDS, "mma_a_stride": MMA_A_STRIDE,
            "mma_tile_k": MMA_TILE_K,
            "mma_a_loads": MMA_ROWS * MMA_K_WORDS // (kernel.block[0] * kernel.block[1]),
            "mma_width": kernel.mma_width, "warps": kernel.warps,
            "mma_call": {"float16": "_mma_f16", "bfloat16": "_mma_bf16"}.get(variant.storage),
            "bits": variant.bits("{}"), "round_bits": variant.round_bits("{}"), "rounded": variant.rounded("{}"),
            "double_buffered": [{"old": state_array(n), "new": new_state_array(n)} for n in kernel.double_buffered]}


def _persistent_launch(kernel: PersistentKernel, prefix: str = "") -> dict[str, Any]:
    """How the host launches the persistent kernel, and per stage what its shared-memory slice needs."""
    return {"name": prefix + kernel.name, "args": list(kernel.arg_names),
            "kinds": [[a.name, a.kind] for a in kernel.args], "block": list(kernel.block),
            "stages": [{"rows": print_index(k.gemm.rows), "units": print_index(k.gemm.units),
                        "columns": k.gemm.columns} for k in kernel.stages]}


def _variant_context(plan: FusedPlan, layout: CudaLayout, variant: Variant, prefix: str) -> dict[str, Any]:
    """One dtype variant's kernels printed, with what the template needs to name its types and conversions."""
    zero = NumbaPrinter(variant.compute).doprint(sympy.Integer(0))
    return {"dtype": variant.storage, "np_dtype": DTYPES[variant.compute], "zero": zero,
            "load": variant.load("{}"), "half": variant.half,
            "shared_zero": f"{variant.element}(0)" if variant.half else zero,
            "kernels": [_printed(plan, k, variant, prefix) for k in (*layout.kernels, *layout.all_rows)],
            "persistent": layout.persistent and _persistent(plan, layout.persistent, variant, prefix)}


def layout_context(layout: CudaLayout, ns: str = "",
                   variants: tuple[Variant, ...] = FORWARD_VARIANTS) -> dict[str, Any]:
    """Everything ``templates/cuda/forward.py.j2`` needs from a layout, as plain values; ``ns``
    ("" or "_train") ends the host function's name and starts every kernel's (``train_stage0``);
    ``variants``: the dtype variants to print (the training forward has no half ones)."""
    plan = layout.plan
    spec = plan.spec
    state_names = [s.name for s in spec.states]
    prefix = f"{ns.strip('_')}_" if ns else ""
    launches = [_launch(k, prefix) for k in layout.kernels]
    all_rows = [_launch(k, prefix) for k in layout.all_rows]
    persistent = layout.persistent and _persistent_launch(layout.persistent, prefix)
    return {
        "ns": ns,
        "saved": [{"name": saved_array(n), "width": print_index(w)} for n, w in plan.time_loop.saved],
        "block": list(layout.block),
        "dtypes": [_variant_context(plan, layout, v, prefix) for v in variants],
        "storage_args": [*layout.weights, *STORAGE_ARGS],
        "launches": launches,
        "all_rows": all_rows,
        "all_rows_max": layout.all_rows_max,
        "persistent": persistent,
        "compiled": launches + all_rows + ([persistent] if persistent else []),  # every kernel, for _CUDA_ARGS
        "scan": layout.scan,
        "gates": list(layout.gates),
        "weights": [{"array": w, "index": s} for s, w in enumerate(layout.weights)],
        "recurrent_states": [{"array": state_array(n), "index": state_names.index(n)}
                             for n in layout.recurrent_states],
        "double_buffered": [{"old": state_array(n), "new": new_state_array(n)} for n in layout.double_buffered],
        "buffers": [{"name": b.name, "width": print_index(b.width)} for b in layout.buffers],
        "unit_params": [{"array": plan.param_arrays[n], "name": n} for n in layout.unit_params],
        # the hyperparameters some kernel takes (a dead one's is bound nowhere)
        "hypers": [{"name": h.name, "kernel": hyper_name(h.name)} for h in spec.hypers
                   if hyper_name(h.name) in {a for k in layout.kernels for a in k.arg_names}],
        "delay_index": None if layout.delay_state is None else state_names.index(layout.delay_state),
        "hoisted": layout.hoisted,
        "delayed": layout.delayed,
        "output_size": print_index(plan.output_size),
        # whether the host function allocates or casts anything in the compute dtype (else it names none)
        "computes": bool(layout.buffers or layout.double_buffered or plan.time_loop.saved or any(
            hyper_name(h.name) in {a for k in layout.kernels for a in k.arg_names} for h in spec.hypers)),
    }


def context(plan: FusedPlan) -> dict[str, Any]:
    """The backend's template context: :func:`layout_context` of :func:`cuda_layout`, and under
    ``train`` the forward that saves and under ``backward`` the reverse loop's kernels."""
    training = training_plan(plan.spec)
    return {**layout_context(cuda_layout(plan)),
            "train": layout_context(cuda_layout(training.forward), "_train", TRAIN_VARIANTS),
            "backward": backward_context(training)}
