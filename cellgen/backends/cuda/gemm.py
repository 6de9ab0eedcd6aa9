"""CUDA runtime: the hoisted GEMM ``c[M, N] = a[M, K] @ w[K, N] + bias``, one kernel for every cell.

The hoisted GEMM (all T*B input rows times the hoisted weight, docs/gpu.md) does not depend on
the cell, so it lives here once instead of in every generated module: one kernel source
(:func:`source`), made per dtype and jitted lazily, once per dtype per process
(:func:`kernel`). ``numba.cuda`` is imported on the first launch only, so a CPU-only install
imports this module.

Tiles: :data:`TILE` x :data:`TILE` outputs per block of :data:`THREADS` x :data:`THREADS`
threads, each thread :data:`PER_THREAD` x :data:`PER_THREAD` outputs in registers, K tile
:data:`TILE_K`; both tiles in shared memory (A padded by one column: no bank conflicts), bias
added before the store.

Half storage (``storage="float16"`` / ``"bfloat16"``, :mod:`cellgen.backends.cuda.precision`):
``a`` and ``w`` hold the 16-bit storage (uint16 patterns for bfloat16), ``bias`` and ``c`` are
float32; every load is widened to float32 on its way into shared memory and the products
accumulate in float32. float32 and float64 (``storage=None``: the dtype of ``c``) compile as
before: their widening is a cast of a value to its own type, which numba drops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cellgen.backends.cuda import precision
from cellgen.backends.cuda import runtime as rt

#: Outputs per block along each side, threads per block along each side, the K tile.
TILE, THREADS, TILE_K = 64, 16, 16
#: Outputs per thread along each side (a PER_THREAD x PER_THREAD register tile).
PER_THREAD = TILE // THREADS
#: Folded here: numba types a shared array's shape from literals, not from arithmetic in the kernel.
A_COLUMNS = TILE_K + 1  # the A tile's row, padded by one: no bank conflicts
TILE_ELEMENTS, BLOCK_THREADS = TILE * TILE_K, THREADS * THREADS
#: The kernel's thread block, and its arguments with their kinds (as ``_CUDA_ARGS`` states them).
BLOCK = (THREADS, THREADS)
ARGS = (("a", "array2"), ("w", "array2"), ("bias", "array1"), ("c", "array2"))

cuda = None  # numba.cuda, bound by kernel() (the kernel source reads it; the simulator swaps it)
_JITTED: dict[tuple[str, bool], Any] = {}


def _widen(storage: str) -> Callable:
    """What a kernel calls on every element it loads from ``a`` and ``w``: the compute type's cast
    (a no-op for float32 and float64, numba's float16 -> float32 conversion), or for bfloat16 the
    bit-pattern widening of :func:`precision.device_functions` (NumPy in the simulator)."""
    if storage == "bfloat16":
        return precision.device_functions(cuda, rt.simulated()).bf16_to_f32
    return np.dtype(precision.compute_name(storage)).type


def source(dtype, transpose_a: bool = False, storage: str | None = None) -> Callable:
    """The hoisted GEMM for ``dtype`` as a plain function (``cuda.jit`` compiles it; so does ``cellgen inspect``).

    Its element type and zero are constants of the closure: numba compiles them as literals.
    ``transpose_a``: ``a`` is given as [K, M] (``a^T @ w``: the backward's weight gradients over all
    T*B rows, operands^T @ d_gates). ``storage``: what ``a`` and ``w`` hold (None: ``dtype``); for
    float16 and bfloat16 the kernel computes, accumulates and stores in float32 (``dtype`` unused).
    """
    storage = storage or np.dtype(dtype).name
    real = np.dtype(precision.compute_name(storage)).type
    zero = real(0.0)
    widen = _widen(storage)

    def hoisted_gemm(a, w, bias, c):
        """c[M, N] = a[M, K] @ w[K, N] + bias: 64x64 tiles through shared memory, 16x16 threads,
        4x4 outputs per thread, bias added before the store."""
        _tx = cuda.threadIdx.x
        _ty = cuda.threadIdx.y
        _tid = _ty * THREADS + _tx
        _m0 = cuda.blockIdx.y * TILE
        _n0 = cuda.blockIdx.x * TILE
        _M = c.shape[0]
        _N = c.shape[1]
        _K = a.shape[0] if transpose_a else a.shape[1]
        _sa = cuda.shared.array((TILE, A_COLUMNS), real)
        _sw = cuda.shared.array((TILE_K, TILE), real)
        _acc = cuda.local.array((PER_THREAD, PER_THREAD), real)
        for _i in range(PER_THREAD):
            for _j in range(PER_THREAD):
                _acc[_i, _j] = zero
        for _k0 in range(0, _K, TILE_K):
            for _e in range(_tid, TILE_ELEMENTS, BLOCK_THREADS):
                _r = _e // TILE_K
                _q = _e - _r * TILE_K
                if transpose_a:
                    _sa[_r, _q] = widen(a[_k0 + _q, _m0 + _r]) if _m0 + _r < _M and _k0 + _q < _K else zero
                else:
                    _sa[_r, _q] = widen(a[_m0 + _r, _k0 + _q]) if _m0 + _r < _M and _k0 + _q < _K else zero
                _q = _e // TILE
                _r = _e - _q * TILE
                _sw[_q, _r] = widen(w[_k0 + _q, _n0 + _r]) if _k0 + _q < _K and _n0 + _r < _N else zero
            cuda.syncthreads()
            for _q in range(TILE_K):
                for _i in range(PER_THREAD):
                    _a = _sa[_ty + THREADS * _i, _q]
                    for _j in range(PER_THREAD):
                        _acc[_i, _j] += _a * _sw[_q, _tx + THREADS * _j]
            cuda.syncthreads()
        for _i in range(PER_THREAD):
            _m = _m0 + _ty + THREADS * _i
            for _j in range(PER_THREAD):
                _n = _n0 + _tx + THREADS * _j
                if _m < _M and _n < _N:
                    c[_m, _n] = _acc[_i, _j] + bias[_n]

    return hoisted_gemm


def kernel(dtype, transpose_a: bool = False, storage: str | None = None) -> Any:
    """The jitted GEMM for ``dtype`` (or half ``storage``): imports numba.cuda (and binds ``cuda``) on first use."""
    global cuda
    key = (storage or np.dtype(dtype).name, transpose_a)
    if key not in _JITTED:
        cuda = rt.numba_cuda()
        _JITTED[key] = cuda.jit(source(dtype, transpose_a, storage))
    return _JITTED[key]


def _check_storage(storage: str, operands: tuple, out) -> None:
    """Half storage: the operands hold its device dtype, the output is float32 (a ValueError otherwise)."""
    if storage not in precision.HALF:
        raise ValueError(f"storage must be None, float16 or bfloat16, got {storage!r}")
    held = precision.device_dtype(storage)
    if any(np.dtype(x.dtype) != held for x in operands) or np.dtype(out.dtype) != np.float32:
        raise ValueError(f"storage={storage}: a and w must be {held.name} and c float32, got "
                         f"{', '.join(np.dtype(x.dtype).name for x in (*operands, out))}")


def matmul(a, w, bias, c, transpose_a: bool = False, storage: str | None = None) -> Any:
    """``c = a @ w + bias`` (``a^T @ w + bias`` with ``transpose_a``) into the device array ``c`` [M, N].

    ``storage``: None computes in ``c``'s dtype (float32 or float64, like ``a``, ``w`` and ``bias``);
    "float16" / "bfloat16": ``a`` and ``w`` hold that storage (uint16 patterns for bfloat16),
    ``bias`` and ``c`` are float32, the accumulation float32.
    """
    if storage is not None:
        _check_storage(storage, (a, w), c)
    if c.shape[0] and c.shape[1]:
        grid = (rt.blocks(c.shape[1], TILE), rt.blocks(c.shape[0], TILE))
        kernel(c.dtype, transpose_a, storage)[grid, BLOCK](a, w, bias, c)
    return c


def hoisted_gemm(xs, weight, bias, allocate: Callable | None = None, storage: str | None = None) -> Any:
    """``xs [T, B, I] @ weight [I, N] + bias`` over all T*B rows, on the device: [T, B, N]
    (into ``allocate((T, B, N), dtype)``, e.g. a pooled buffer, if given). ``storage`` as in
    :func:`matmul`: for float16 / bfloat16, ``xs`` and ``weight`` hold it and ``pre`` is float32."""
    steps, batch, size = xs.shape
    width = weight.shape[1]
    out = np.float32 if storage is not None else xs.dtype
    pre = (allocate or rt.empty)((steps, batch, width), out)
    if steps * batch and width:
        matmul(xs.reshape(steps * batch, size), weight, bias, pre.reshape(steps * batch, width), storage=storage)
    return pre
