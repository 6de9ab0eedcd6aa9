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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

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
_JITTED: dict[tuple[np.dtype, bool], Any] = {}


def source(dtype, transpose_a: bool = False) -> Callable:
    """The hoisted GEMM for ``dtype`` as a plain function (``cuda.jit`` compiles it; so does ``cellgen inspect``).

    Its element type and zero are constants of the closure: numba compiles them as literals.
    ``transpose_a``: ``a`` is given as [K, M] (``a^T @ w``: the backward's weight gradients over all
    T*B rows, operands^T @ d_gates).
    """
    real = np.dtype(dtype).type
    zero = real(0.0)

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
                    _sa[_r, _q] = a[_k0 + _q, _m0 + _r] if _m0 + _r < _M and _k0 + _q < _K else zero
                else:
                    _sa[_r, _q] = a[_m0 + _r, _k0 + _q] if _m0 + _r < _M and _k0 + _q < _K else zero
                _q = _e // TILE
                _r = _e - _q * TILE
                _sw[_q, _r] = w[_k0 + _q, _n0 + _r] if _k0 + _q < _K and _n0 + _r < _N else zero
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


def kernel(dtype, transpose_a: bool = False) -> Any:
    """The jitted GEMM for ``dtype``: imports numba.cuda (and binds ``cuda``) on first use."""
    global cuda
    key = (np.dtype(dtype), transpose_a)
    if key not in _JITTED:
        cuda = rt.numba_cuda()
        _JITTED[key] = cuda.jit(source(dtype, transpose_a))
    return _JITTED[key]


def matmul(a, w, bias, c, transpose_a: bool = False) -> Any:
    """``c = a @ w + bias`` (``a^T @ w + bias`` with ``transpose_a``) into the device array ``c`` [M, N]."""
    if c.shape[0] and c.shape[1]:
        grid = (rt.blocks(c.shape[1], TILE), rt.blocks(c.shape[0], TILE))
        kernel(c.dtype, transpose_a)[grid, BLOCK](a, w, bias, c)
    return c


def hoisted_gemm(xs, weight, bias, allocate: Callable | None = None) -> Any:
    """``xs [T, B, I] @ weight [I, N] + bias`` over all T*B rows, on the device: [T, B, N]
    (into ``allocate((T, B, N), dtype)``, e.g. a pooled buffer, if given)."""
    steps, batch, size = xs.shape
    width = weight.shape[1]
    pre = (allocate or rt.empty)((steps, batch, width), xs.dtype)
    if steps * batch and width:
        grid = (rt.blocks(width, TILE), rt.blocks(steps * batch, TILE))
        kernel(xs.dtype)[grid, BLOCK](xs.reshape(steps * batch, size), weight, bias, pre.reshape(steps * batch, width))
    return pre
