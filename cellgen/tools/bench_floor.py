"""`cellgen bench` helpers: the GEMM floors of a fused plan (its matrix products and nothing else).

Two floors, both for the exact products the fused plan performs (one hoisted GEMM over
T*B rows, then every recurrent GEMM once per step), no elementwise work:

* **BLAS floor**: the hoisted GEMM through NumPy's BLAS and the T recurrent GEMMs through
  SciPy's BLAS ``sgemm``/``dgemm`` (``scipy.linalg.cython_blas``, the BLAS Numba's
  ``np.dot`` calls), called from a compiled loop so no Python overhead is counted. This is
  the issue's "GEMM floor": the limit of any implementation that calls BLAS per product.
* **kernel floor**: the same products through cellgen's own packed micro-kernel
  (:mod:`cellgen.backends.cpu.gemm`), split over the same threads as the generated kernel (one
  parallel region; by batch rows, or by column panels with a barrier after each product:
  ``gemm.split_rows``): the limit of the generated kernel itself.

And the **training floor** (``cellgen bench --train``): the GEMMs of one training step, the
forward's products as above, then the fused backward's: per step (T to 0) each transposed
recurrent GEMM ``dg_s[t] @ W_s^T`` (stages in reverse order) through the packed micro-kernel,
split as the forward's, and after the loop, through the packed GEMM exactly as the generated
``_backward_cpu`` does (``gemm.matmul_tn`` / ``matmul_nt``), one weight GEMM per stage
``operands^T @ d_gates`` over all T*B rows,
``x^T @ d_pre`` for the hoisted weight and the inputs' adjoint ``d_pre @ W_hoisted^T``
(T+1 rows of ``x`` and ``d_pre`` when the plan has a delay state).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy
from numba import njit, prange
from numba.extending import get_cython_function_address

from cellgen.ir.plan import FusedPlan
from cellgen.backends.cpu import gemm as _gemm
from cellgen.backends.cpu import sync as _sync

_GEMM_TYPE = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))
_sgemm = _GEMM_TYPE(get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
_dgemm = _GEMM_TYPE(get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))


@dataclass(frozen=True)
class Products:
    """The matrix products of one forward call: hoisted (K, N) or None, recurrent [(K, N), ...]."""

    rows: int
    max_time: int
    hoisted: tuple[int, int] | None
    recurrent: tuple[tuple[int, int], ...]


def products(plan: FusedPlan, batch: int, max_time: int, sizes: dict[str, int]) -> Products:
    """The plan's GEMM shapes with the sizes filled in."""
    def val(e) -> int:
        e = sympy.sympify(e)
        return int(e.subs({s: sizes[s.name] for s in e.free_symbols}))

    hoisted = (val(plan.hoisted.rows), val(plan.hoisted.width)) if plan.hoisted is not None else None
    recurrent = tuple((val(g.rows), val(g.width)) for g in plan.gemms)
    return Products(batch, max_time, hoisted, recurrent)


@njit(nogil=True)
def _blas_steps(a, w, c, steps, fn32):
    """``c = a @ w`` ``steps`` times through BLAS (row-major: C^T = W^T A^T, column-major)."""
    rows, k = a.shape
    n = w.shape[1]
    ints = np.empty(6, np.int32)
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = n, rows, k, n, k, n
    scal = np.zeros(2, a.dtype)
    scal[0] = 1.0
    trans = np.empty(1, np.uint8)
    trans[0] = 78  # 'N'
    for _ in range(steps):
        if fn32:
            _sgemm(trans.ctypes, trans.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, scal.ctypes,
                   w.ctypes, ints[3:].ctypes, a.ctypes, ints[4:].ctypes, scal[1:].ctypes, c.ctypes, ints[5:].ctypes)
        else:
            _dgemm(trans.ctypes, trans.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, scal.ctypes,
                   w.ctypes, ints[3:].ctypes, a.ctypes, ints[4:].ctypes, scal[1:].ctypes, c.ctypes, ints[5:].ctypes)


@njit(nogil=True)
def _kernel_thread(q, nth, sync, fn, steps, a, wp, c, bias, by_rows):
    """Thread q of nth: ``c[i] = a[i] @ W[i]`` for each product i, ``steps`` times, split as
    the generated kernels split them: its batch rows of every panel (``by_rows``, no
    barrier) or its panels of every row, a barrier after each product."""
    if not by_rows and not _sync.rendezvous(sync, nth):
        return
    rows = a[0].shape[0]
    r0 = q * rows // nth
    r1 = (q + 1) * rows // nth
    passed = np.int64(0)
    for _ in range(steps):
        for i in range(len(wp)):
            panels = wp[i].shape[0]
            if by_rows:
                _gemm.gemm_panels(fn, c[i], a[i], wp[i], bias[i], np.int64(0), panels, r0, r1)
            else:
                _gemm.gemm_panels(fn, c[i], a[i], wp[i], bias[i], q * panels // nth, (q + 1) * panels // nth,
                                  np.int64(0), rows)
                passed = _sync.barrier(sync, nth, passed)


@njit(nogil=True, parallel=_sync.PRANGE_ONLY)
def _kernel_steps(fn, steps, a, wp, c, bias, nth, by_rows):
    """The recurrent products of ``steps`` steps in one parallel region (or on this thread).

    Only the ``prange`` is parallel, as in the generated kernels: with ``parallel=True`` Numba also
    made the ``np.zeros`` a parfor, a second parallel region on every call, even with ``nth == 1``."""
    sync = np.zeros(_sync.SYNC_WORDS, dtype=np.int64)
    if nth > 1:
        for q in prange(nth):
            _kernel_thread(np.int64(q), nth, sync, fn, steps, a, wp, c, bias, by_rows)
    if nth == 1 or _sync.called_off(sync):
        _kernel_thread(np.int64(0), np.int64(1), sync, fn, steps, a, wp, c, bias, by_rows)


def _operands(shape: tuple[int, int], rows: int, dtype, rng) -> tuple[np.ndarray, np.ndarray]:
    k, n = shape
    return (rng.standard_normal((rows, k)).astype(dtype), (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype))


def blas_floor(p: Products, dtype=np.float32, seed: int = 0) -> Callable[[], None]:
    """A callable doing the plan's products through BLAS (hoisted with NumPy, steps compiled)."""
    rng = np.random.default_rng(seed)
    xs, w_in = _operands(p.hoisted, p.rows * p.max_time, dtype, rng) if p.hoisted else (None, None)
    steps = []
    for shape in p.recurrent:
        a, w = _operands(shape, p.rows, dtype, rng)
        steps.append((a, w, np.empty((p.rows, shape[1]), dtype)))
    fn32 = np.dtype(dtype) == np.float32

    def run() -> None:
        if xs is not None:
            np.matmul(xs, w_in)
        if len(steps) == 1:
            _blas_steps(*steps[0], p.max_time, fn32)
        else:  # several GEMMs per step: keep their order inside each step
            for _ in range(p.max_time):
                for a, w, c in steps:
                    _blas_steps(a, w, c, 1, fn32)

    return run


def kernel_floor(p: Products, dtype=np.float32, seed: int = 0) -> Callable[[], None]:
    """A callable doing the plan's products through cellgen's packed micro-kernel, same threads."""
    rng = np.random.default_rng(seed)
    per_row = sum(k * n for k, n in p.recurrent)
    nth = _gemm.threads_for_steps(p.rows, p.max_time, per_row) if p.recurrent else 1
    hoisted = None
    if p.hoisted:
        xs, w_in = _operands(p.hoisted, p.rows * p.max_time, dtype, rng)
        hoisted = (xs, _gemm.pack(w_in), _gemm.pad_bias(None, p.hoisted[1], dtype))
    a, wp, c, bias = [], [], [], []
    for shape in p.recurrent:
        a_i, w = _operands(shape, p.rows, dtype, rng)
        a.append(a_i)
        wp.append(_gemm.pack(w))
        c.append(np.empty((p.rows, wp[-1].shape[0] * wp[-1].shape[2]), dtype))
        bias.append(_gemm.pad_bias(None, shape[1], dtype))
    steps = (tuple(a), tuple(wp), tuple(c), tuple(bias))
    by_rows = _gemm.split_rows(p.rows, nth)

    def run() -> None:
        if hoisted is not None:
            _gemm.matmul(hoisted[0], hoisted[1], hoisted[2])
        if p.recurrent:
            _kernel_steps(_gemm.PANELS, p.max_time, *steps, nth, by_rows)

    return run


@dataclass(frozen=True)
class TrainProducts:
    """The matrix products of one training step (forward, reverse loop, after the loop).

    ``transposed``: the per-step ``dg_s[t] @ W_s^T`` as (K, N) = (width_s, rows_s), in the order
    the reverse loop runs them (last stage first); ``weight_grads``: the after-loop
    ``operands_s^T @ dg_s`` as (rows_s, width_s), one per stage; ``hoisted_rows``: the rows of
    ``x`` and ``d_pre`` after the loop (T*B, or (T+1)*B with a delay state's x_{-1}).
    """

    forward: Products
    transposed: tuple[tuple[int, int], ...]
    weight_grads: tuple[tuple[int, int], ...]
    hoisted_rows: int


def train_products(plan: FusedPlan, batch: int, max_time: int, sizes: dict[str, int]) -> TrainProducts:
    """The training step's GEMM shapes with the sizes filled in (the forward plan's stages)."""
    fwd = products(plan, batch, max_time, sizes)
    delayed = plan.hoisted is not None and plan.hoisted.delayed
    return TrainProducts(fwd, tuple((n, k) for k, n in reversed(fwd.recurrent)), fwd.recurrent,
                         batch * (max_time + 1 if delayed else max_time))


def train_floor_parts(p: TrainProducts, dtype=np.float32, seed: int = 0) -> dict[str, Callable[[], None]]:
    """The training floor in its three parts, each a callable: ``forward`` (the forward floor),
    ``reverse loop`` (T steps of the transposed recurrent GEMMs, packed micro-kernel, one
    parallel region, split like the generated backward) and ``after loop`` (the packed GEMM, as the
    generated backward)."""
    rng = np.random.default_rng(seed + 1)
    f = p.forward
    parts = {"forward": kernel_floor(f, dtype, seed)}
    per_row = sum(k * n for k, n in f.recurrent)
    nth = _gemm.threads_for_steps(f.rows, f.max_time, per_row) if f.recurrent else 1
    by_rows = nth == 1 or _gemm.split_rows(f.rows, nth)  # as _backward_cpu
    a, wp, c, bias = [], [], [], []
    for shape in p.transposed:
        a_i, w = _operands(shape, f.rows, dtype, rng)
        a.append(a_i)
        wp.append(_gemm.pack(np.ascontiguousarray(w)))
        c.append(np.zeros((f.rows, wp[-1].shape[0] * wp[-1].shape[2]), dtype))
        bias.append(_gemm.pad_bias(None, shape[1], dtype))
    steps = (tuple(a), tuple(wp), tuple(c), tuple(bias))

    def reverse_loop() -> None:
        if p.transposed:
            _kernel_steps(_gemm.PANELS, f.max_time, *steps, nth, by_rows)

    rows = f.rows * f.max_time
    grads = [(rng.standard_normal((rows, k)).astype(dtype), rng.standard_normal((rows, n)).astype(dtype))
             for k, n in p.weight_grads]
    hoisted = None
    if f.hoisted is not None:
        k, n = f.hoisted
        hoisted = (rng.standard_normal((p.hoisted_rows, k)).astype(dtype),
                   rng.standard_normal((p.hoisted_rows, n)).astype(dtype),
                   (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype))

    def after_loop() -> None:
        for operand, d_gates in grads:  # d_W_s = operands^T @ d_gates over all T*B rows
            _gemm.matmul_tn(operand, d_gates)
        if hoisted is not None:
            xa, dpre, w_hoisted = hoisted
            _gemm.matmul_tn(xa, dpre)  # the hoisted weight's adjoint
            _gemm.matmul_nt(dpre, w_hoisted)  # the inputs' adjoint

    parts["reverse loop"] = reverse_loop
    parts["after loop"] = after_loop
    return parts


def train_floor(parts: dict[str, Callable[[], None]]) -> Callable[[], None]:
    """A callable doing all the GEMMs of one training step: :func:`train_floor_parts`, in order."""
    forward, reverse, after = parts["forward"], parts["reverse loop"], parts["after loop"]

    def run() -> None:
        forward()
        reverse()
        after()

    return run
