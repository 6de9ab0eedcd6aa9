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
float32, the accumulation float32. On the device (sm_80 and newer) and in the simulator they run
on tensor cores (:func:`mma_source`, docs/gpu.md "Tensor cores"); on an older GPU the SIMT kernel
above widens every load to float32 on its way into shared memory. float32 and float64
(``storage=None``: the dtype of ``c``) compile as before: their widening is a cast of a value to
its own type, which numba drops.

The tensor-core kernel: :data:`MMA_TILE_M` x :data:`MMA_TILE_N` outputs per block of
:data:`MMA_THREADS` threads (4 warps, 2 x 2, each a 32 x 32 sub-tile of 2 x 4 ``m16n8k16`` MMAs,
32 float32 accumulators per thread), K tile :data:`MMA_TILE_K`. Both operand tiles sit in shared
memory as 32-bit words of two K-adjacent 16-bit elements (the MMA's register format), A as
[row][k pair] and W transposed, [column][k pair]; word column ``q`` of row ``r`` is stored at
``q ^ swizzle(r)`` (:func:`swizzle`), which makes both the fragment reads and the tile stores free
of bank conflicts without padding. Each thread loads its next K tile into registers (32 16-bit
global loads in flight, zero outside M, N, K) before the warps multiply the current one. Its
offsets are 32-bit: operands of 2^32 elements or more (8 GiB) take the SIMT kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cellgen.backends.cuda import mma, precision
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
#: The tensor-core kernel's arguments: a and w flat 16-bit patterns (``bits1``: uint16), K.
MMA_ARGS = (("a", "bits1"), ("w", "bits1"), ("bias", "array1"), ("c", "array2"), ("k", "int"))

#: The tensor-core kernel: block tile, K tile, threads (4 warps), 32-bit words per tile row, words per thread.
MMA_TILE_M, MMA_TILE_N, MMA_TILE_K, MMA_THREADS = 64, 64, 32, 128
MMA_WORDS = MMA_TILE_K // 2
MMA_PER_THREAD = MMA_TILE_M * MMA_WORDS // MMA_THREADS
MMA_BLOCK = (MMA_THREADS,)

cuda = None  # numba.cuda, bound by kernel() (the kernel source reads it; the simulator swaps it)
_JITTED: dict[tuple[str, bool, bool], Any] = {}


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


def swizzle(row):
    """The XOR applied to a word column of tile row (or column) ``row``: bits 1-2 of the row to
    bits 2-3 of the word, bits 3-4 to bits 0-1 (the kernel writes the same expression inline).

    A warp's fragment read (8 rows g, 4 words t) and a warp's tile store (32 consecutive rows, one
    word; or 2 rows, 16 words) then touch 32 different banks: rows of 16 words put the row's parity
    on bank bit 4, and the XOR keeps the other 4 bits apart (tests/test_cuda_mma.py counts them)."""
    return ((row & np.uint32(6)) << np.uint32(1)) | ((row >> np.uint32(3)) & np.uint32(3))


def mma_source(storage: str, transpose_a: bool = False) -> Callable:
    """The tensor-core GEMM for half ``storage`` as a plain function (``cuda.jit`` compiles it; so does
    ``cellgen inspect``): ``c[M, N] = a @ w + bias`` with ``a`` [M, K] (or [K, M] with
    ``transpose_a``) and ``w`` [K, N] given flat, as the 16-bit patterns (uint16) of ``storage`` in C
    order, ``k`` = K, ``bias`` and ``c`` float32 (module docstring). Flat operands and every index
    as a uint32 offset: 32-bit index math (numba widens integer arithmetic to 64 bits; each step is
    narrowed back). The MMA and the pack are :mod:`cellgen.backends.cuda.mma`'s."""
    ops = mma.device_functions(cuda, rt.simulated(), storage)
    product, pack = ops.mma, ops.pack
    u32 = np.uint32
    nothing = np.uint16(0)

    def hoisted_gemm_mma(a, w, bias, c, k):
        """c = a @ w + bias on tensor cores: 64x64 block tile, 4 warps of 32x32, K tile 32."""
        _tid = u32(cuda.threadIdx.x)
        _g = u32(u32(_tid & u32(31)) >> u32(2))
        _t = u32(_tid & u32(3))
        _sg = u32(u32(_g & u32(6)) << u32(1))  # swizzle(row) of a fragment row: _sg | (row >> 3 & 3)
        _wm = u32(u32(_tid >> u32(6)) * u32(32))
        _wn = u32(u32(u32(_tid >> u32(5)) & u32(1)) * u32(32))
        _m0 = u32(u32(cuda.blockIdx.y) * u32(MMA_TILE_M))
        _n0 = u32(u32(cuda.blockIdx.x) * u32(MMA_TILE_N))
        _M = u32(c.shape[0])
        _N = u32(c.shape[1])
        _K = u32(k)
        # this thread's words of a tile: A row/column _ra, word _qa (+ 8 rows or + 2 words a step),
        # W column _rn, word _qn + 2 a step; their flat offsets in a and w at k0 = 0
        _ra = u32(_tid & u32(63)) if transpose_a else u32(_tid >> u32(4))
        _qa = u32(_tid >> u32(6)) if transpose_a else u32(_tid & u32(15))
        _rn = u32(_tid & u32(63))
        _qn = u32(_tid >> u32(6))
        _sn = u32(u32(u32(_rn & u32(6)) << u32(1)) | u32(u32(_rn >> u32(3)) & u32(3)))  # swizzle(_rn)
        if transpose_a:
            _abase = u32(u32(u32(u32(2) * _qa) * _M) + u32(_m0 + _ra))
            _astep = u32(u32(4) * _M)  # a step: 2 words = 4 rows of a [K, M]
        else:
            _abase = u32(u32(u32(_m0 + _ra) * _K) + u32(u32(2) * _qa))
            _astep = u32(u32(8) * _K)  # a step: 8 rows of a [M, K]
        _wbase = u32(u32(u32(u32(2) * _qn) * _N) + u32(_n0 + _rn))
        _wstep = u32(u32(4) * _N)
        _nok = u32(_n0 + _rn) < _N
        _sa = cuda.shared.array((MMA_TILE_M, MMA_WORDS), np.uint32)
        _sw = cuda.shared.array((MMA_TILE_N, MMA_WORDS), np.uint32)
        _acc = cuda.local.array((2, 4, 4), np.float32)
        _va = cuda.local.array(MMA_PER_THREAD, np.uint32)
        _vw = cuda.local.array(MMA_PER_THREAD, np.uint32)
        _fa = cuda.local.array((2, 4), np.uint32)
        _fb = cuda.local.array((4, 2), np.uint32)
        for _i in range(2):
            for _j in range(4):
                for _e in range(4):
                    _acc[_i, _j, _e] = np.float32(0.0)
        _tiles = u32(u32(_K + u32(MMA_TILE_K - 1)) // u32(MMA_TILE_K))
        _step = u32(0)
        while _step <= _tiles:
            if _step > u32(0):  # the registers hold tile _step - 1: into shared memory
                cuda.syncthreads()
                for _s in range(MMA_PER_THREAD):
                    if transpose_a:
                        _r = _ra
                        _q = u32(_qa + u32(2 * _s))
                    else:
                        _r = u32(_ra + u32(8 * _s))
                        _q = _qa
                    _sa[_r, u32(_q ^ u32(u32(u32(_r & u32(6)) << u32(1)) | u32(u32(_r >> u32(3)) & u32(3))))] = _va[_s]
                    _sw[_rn, u32(u32(_qn + u32(2 * _s)) ^ _sn)] = _vw[_s]
                cuda.syncthreads()
            if _step < _tiles:  # tile _step into registers: every load before the multiply below
                _k0 = u32(_step * u32(MMA_TILE_K))
                for _s in range(MMA_PER_THREAD):
                    if transpose_a:
                        _kk = u32(_k0 + u32(u32(2) * u32(_qa + u32(2 * _s))))
                        _off = u32(u32(_abase + u32(u32(_k0 + u32(4 * _s)) * _M)))
                        _ok = u32(_m0 + _ra) < _M
                        _lo = a[_off] if _ok and _kk < _K else nothing
                        _hi = a[u32(_off + _M)] if _ok and u32(_kk + u32(1)) < _K else nothing
                    else:
                        _kk = u32(_k0 + u32(u32(2) * _qa))
                        _off = u32(u32(_abase + u32(u32(_s) * _astep)) + _k0)
                        _ok = u32(u32(_m0 + _ra) + u32(8 * _s)) < _M
                        _lo = a[_off] if _ok and _kk < _K else nothing
                        _hi = a[u32(_off + u32(1))] if _ok and u32(_kk + u32(1)) < _K else nothing
                    _va[_s] = pack(_lo, _hi)
                    _kk = u32(_k0 + u32(u32(2) * u32(_qn + u32(2 * _s))))
                    _off = u32(_wbase + u32(u32(_k0 + u32(4 * _s)) * _N))
                    _lo = w[_off] if _nok and _kk < _K else nothing
                    _hi = w[u32(_off + _N)] if _nok and u32(_kk + u32(1)) < _K else nothing
                    _vw[_s] = pack(_lo, _hi)
            if _step > u32(0):  # the warps multiply tile _step - 1: two k16 steps of 2 x 4 MMAs
                for _ks in range(2):
                    _kw = u32(u32(8 * _ks) + _t)
                    _kx = u32(_kw + u32(4))
                    for _i in range(2):
                        _r = u32(u32(_wm + u32(16 * _i)) + _g)
                        _x0 = u32(_sg | u32(2 * _i))
                        _x1 = u32(_sg | u32(2 * _i + 1))
                        _fa[_i, 0] = _sa[_r, u32(_kw ^ _x0)]
                        _fa[_i, 1] = _sa[u32(_r + u32(8)), u32(_kw ^ _x1)]
                        _fa[_i, 2] = _sa[_r, u32(_kx ^ _x0)]
                        _fa[_i, 3] = _sa[u32(_r + u32(8)), u32(_kx ^ _x1)]
                    for _j in range(4):
                        _n = u32(u32(_wn + u32(8 * _j)) + _g)
                        _fb[_j, 0] = _sw[_n, u32(_kw ^ u32(_sg | u32(_j)))]
                        _fb[_j, 1] = _sw[_n, u32(_kx ^ u32(_sg | u32(_j)))]
                    for _i in range(2):
                        for _j in range(4):
                            _d = product(_fa[_i, 0], _fa[_i, 1], _fa[_i, 2], _fa[_i, 3], _fb[_j, 0], _fb[_j, 1],
                                         _acc[_i, _j, 0], _acc[_i, _j, 1], _acc[_i, _j, 2], _acc[_i, _j, 3])
                            _acc[_i, _j, 0] = _d[0]
                            _acc[_i, _j, 1] = _d[1]
                            _acc[_i, _j, 2] = _d[2]
                            _acc[_i, _j, 3] = _d[3]
            _step = u32(_step + u32(1))
        for _i in range(2):
            for _j in range(4):
                for _e in range(4):
                    _m = u32(u32(_m0 + _wm) + u32(u32(16 * _i + 8 * (_e >> 1)) + _g))
                    _n = u32(u32(_n0 + _wn) + u32(u32(8 * _j + (_e & 1)) + u32(u32(2) * _t)))
                    if _m < _M and _n < _N:
                        c[_m, _n] = _acc[_i, _j, _e] + bias[_n]

    return hoisted_gemm_mma


def kernel(dtype, transpose_a: bool = False, storage: str | None = None) -> Any:
    """The jitted GEMM for ``dtype`` (or half ``storage``): imports numba.cuda (and binds ``cuda``) on first use."""
    global cuda
    key = (storage or np.dtype(dtype).name, transpose_a, False)
    if key not in _JITTED:
        cuda = rt.numba_cuda()
        _JITTED[key] = cuda.jit(source(dtype, transpose_a, storage))
    return _JITTED[key]


def mma_kernel(storage: str, transpose_a: bool = False) -> Any:
    """The jitted tensor-core GEMM for half ``storage``: imports numba.cuda (and binds ``cuda``) on first use."""
    global cuda
    key = (storage, transpose_a, True)
    if key not in _JITTED:
        cuda = rt.numba_cuda()
        _JITTED[key] = cuda.jit(mma_source(storage, transpose_a))
    return _JITTED[key]


def tensor_cores() -> bool:
    """Whether the hoisted GEMM of half storage runs on tensor cores: in the simulator (the emulated MMA)
    and on sm_80+ (:func:`mma.supported`)."""
    return mma.supported()


def _flat(x) -> Any:
    """A C-contiguous device array of half storage as the flat 16-bit patterns (uint16) the tensor-core
    kernel reads."""
    flat = rt.contiguous(x).reshape(-1)
    return flat if np.dtype(flat.dtype) == np.uint16 else flat.view(np.uint16)


def _check_storage(storage: str, operands: tuple, wide: tuple) -> None:
    """Half storage: the operands hold its device dtype, bias and output are float32 (a ValueError otherwise)."""
    if storage not in precision.HALF:
        raise ValueError(f"storage must be None, float16 or bfloat16, got {storage!r}")
    held = precision.device_dtype(storage)
    if any(np.dtype(x.dtype) != held for x in operands) or any(np.dtype(x.dtype) != np.float32 for x in wide):
        raise ValueError(f"storage={storage}: a and w must be {held.name}, bias and c float32, got "
                         f"{', '.join(np.dtype(x.dtype).name for x in (*operands, *wide))}")


def matmul(a, w, bias, c, transpose_a: bool = False, storage: str | None = None) -> Any:
    """``c = a @ w + bias`` (``a^T @ w + bias`` with ``transpose_a``) into the device array ``c`` [M, N].

    ``storage``: None computes in ``c``'s dtype (float32 or float64, like ``a``, ``w`` and ``bias``);
    "float16" / "bfloat16": ``a`` and ``w`` hold that storage (uint16 patterns for bfloat16),
    ``bias`` and ``c`` are float32, the accumulation float32.
    """
    if storage is not None:
        _check_storage(storage, (a, w), (bias, c))
    if not (c.shape[0] and c.shape[1]):
        return c
    if storage is not None and max(a.size, w.size) < 2**32 and tensor_cores():
        grid = (rt.blocks(c.shape[1], MMA_TILE_N), rt.blocks(c.shape[0], MMA_TILE_M))
        k = a.shape[0] if transpose_a else a.shape[1]
        mma_kernel(storage, transpose_a)[grid, MMA_BLOCK](_flat(a), _flat(w), bias, c, k)
    else:
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
