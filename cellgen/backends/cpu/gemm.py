"""Runtime GEMM for the CPU kernels: packed weights and an LLVM register-blocked micro-kernel.

The recurrent GEMMs of a fused plan multiply a small ``[B, K]`` state by the same
``[K, N]`` weight every step. A per-call BLAS ``sgemm`` re-packs that weight on
every call (OpenBLAS packs both operands), which costs as much as the arithmetic
at B <= 64. Here the weight is packed ONCE into column panels (``[P, K, PANEL]``,
zero-padded) and every step runs a micro-kernel that keeps a ``ROWS x PANEL``
block of the result in vector registers (``ROWS * VECTORS`` accumulators) while
it streams one panel:

    for k in range(K):  acc[r, :] += a[r, k] * panel[k, :]     (r < ROWS, unrolled)

The micro-kernel is emitted as LLVM IR (``numba.extending.intrinsic``): vector
``fma`` on ``<LANES x float>``; LLVM picks the instructions of the host (AVX-512:
16 float lanes; AVX2 machines get 8 lanes so the accumulators fit in 16 ymm
registers). Each output element is one fixed-order sum over k, whatever the
thread split: results do not depend on the thread count.
"""

from __future__ import annotations

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import cfunc, njit, prange, typeof, types
from numba.core import cgutils
from numba.extending import intrinsic

from cellgen.runtime import pool as _pool

#: float lanes of one vector register of the host (AVX-512: 16, else 8).
LANES32 = 16 if "avx512f" in llb.get_host_cpu_features().flatten() else 8
#: vectors per panel row and rows per register block.
VECTORS = 2
ROWS = 6
#: panel width in elements, per dtype (a panel row is VECTORS vectors).
PANEL32 = VECTORS * LANES32
PANEL64 = VECTORS * LANES32 // 2


def _micro_kernel(rows: int, lanes: int, is64: bool):
    """An intrinsic ``mk(c, ldc, a, lda, w, K, bias)``: c[r, :] = bias + sum_k a[r, k] * w[k, :].

    Pointers are raw addresses (``arr.ctypes.data`` plus an offset); ``ldc``/``lda`` are
    row strides in elements; ``w`` is one packed panel ``[K, VECTORS * lanes]``.
    """
    fty = ir.DoubleType() if is64 else ir.FloatType()
    vty = ir.VectorType(fty, lanes)
    size = 8 if is64 else 4

    @intrinsic
    def mk(typingctx, c, ldc, a, lda, w, k_count, bias):
        sig = types.void(types.uintp, types.intp, types.uintp, types.intp, types.uintp, types.intp, types.uintp)

        def codegen(context, builder, signature, args):
            cptr, ldc_, aptr, lda_, wptr, k_, bptr = args
            i64, i32 = ir.IntType(64), ir.IntType(32)
            pf, pv = fty.as_pointer(), vty.as_pointer()
            cbase, abase, wbase = (builder.inttoptr(p, pf) for p in (cptr, aptr, wptr))
            bbase = builder.inttoptr(bptr, pf)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                                 f"llvm.fma.v{lanes}{'f64' if is64 else 'f32'}")
            init = [builder.load(builder.bitcast(builder.gep(bbase, [ir.Constant(i64, v * lanes)]), pv),
                                 align=size) for v in range(VECTORS)]
            entry = builder.block
            loop = builder.append_basic_block("mk_loop")
            done = builder.append_basic_block("mk_done")
            builder.cbranch(builder.icmp_signed(">", k_, ir.Constant(i64, 0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), entry)
            acc = [[builder.phi(vty) for _ in range(VECTORS)] for _ in range(rows)]
            for r in range(rows):
                for v in range(VECTORS):
                    acc[r][v].add_incoming(init[v], entry)
            woff = builder.mul(k, ir.Constant(i64, VECTORS * lanes))
            wv = [builder.load(builder.bitcast(builder.gep(wbase, [builder.add(woff, ir.Constant(i64, v * lanes))]),
                                               pv), align=size) for v in range(VECTORS)]
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            new = []
            for r in range(rows):
                x = builder.load(builder.gep(abase, [builder.add(builder.mul(ir.Constant(i64, r), lda_), k)]))
                xv = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(i32, 0))
                xv = builder.shuffle_vector(xv, ir.Constant(vty, ir.Undefined), splat)
                new.append([builder.call(fma, [xv, wv[v], acc[r][v]]) for v in range(VECTORS)])
            k_next = builder.add(k, ir.Constant(i64, 1))
            tail = builder.block
            k.add_incoming(k_next, tail)
            for r in range(rows):
                for v in range(VECTORS):
                    acc[r][v].add_incoming(new[r][v], tail)
            builder.cbranch(builder.icmp_signed("<", k_next, k_), loop, done)

            builder.position_at_end(done)
            final = []
            for r in range(rows):
                for v in range(VECTORS):
                    phi = builder.phi(vty)
                    phi.add_incoming(init[v], entry)
                    phi.add_incoming(new[r][v], tail)
                    final.append(phi)
            for r in range(rows):
                row = builder.mul(ir.Constant(i64, r), ldc_)
                for v in range(VECTORS):
                    ptr = builder.gep(cbase, [builder.add(row, ir.Constant(i64, v * lanes))])
                    builder.store(final[r * VECTORS + v], builder.bitcast(ptr, pv), align=size)
            return context.get_dummy_value()

        return sig, codegen

    return mk


_K32 = [_micro_kernel(r, LANES32, False) for r in range(1, ROWS + 1)]
_K64 = [_micro_kernel(r, LANES32 // 2, True) for r in range(1, ROWS + 1)]


_m32_1, _m32_2, _m32_3, _m32_4, _m32_5, _m32_6 = _K32
_m64_1, _m64_2, _m64_3, _m64_4, _m64_5, _m64_6 = _K64


def _panels_raw(item, c, ldc, a, lda, w, k, bias, panel, p0, p1, r0, r1):
    """The panel/row-block loop on raw addresses, compiled ONCE as a C callback (``PANELS``).

    Kernels call it through its address (:func:`gemm_panels`), so its large unrolled code is
    never linked into, and re-optimized with, each generated kernel: the micro-kernels are
    compiled once per machine (on-disk cache) and every spec's kernel stays cheap to compile.
    """
    for p in range(p0, p1):
        wp = w + p * k * panel * item
        bp = bias + p * panel * item
        for r in range(r0, r1, ROWS):
            rows = min(ROWS, r1 - r)
            cp = c + (r * ldc + p * panel) * item
            ap = a + r * lda * item
            if item == 4:
                if rows == 6:
                    _m32_6(cp, ldc, ap, lda, wp, k, bp)
                elif rows == 5:
                    _m32_5(cp, ldc, ap, lda, wp, k, bp)
                elif rows == 4:
                    _m32_4(cp, ldc, ap, lda, wp, k, bp)
                elif rows == 3:
                    _m32_3(cp, ldc, ap, lda, wp, k, bp)
                elif rows == 2:
                    _m32_2(cp, ldc, ap, lda, wp, k, bp)
                else:
                    _m32_1(cp, ldc, ap, lda, wp, k, bp)
            elif rows == 6:
                _m64_6(cp, ldc, ap, lda, wp, k, bp)
            elif rows == 5:
                _m64_5(cp, ldc, ap, lda, wp, k, bp)
            elif rows == 4:
                _m64_4(cp, ldc, ap, lda, wp, k, bp)
            elif rows == 3:
                _m64_3(cp, ldc, ap, lda, wp, k, bp)
            elif rows == 2:
                _m64_2(cp, ldc, ap, lda, wp, k, bp)
            else:
                _m64_1(cp, ldc, ap, lda, wp, k, bp)


assert ROWS == 6  # the dispatch in _panels_raw
_RAW_SIG = types.void(*([types.intp] * 13))
_panels_cfunc = cfunc(_RAW_SIG, cache=True, nogil=True)(_panels_raw)
#: Address of the compiled panel loop: pass it to kernels as an argument (a global would be
#: frozen into Numba's on-disk cache, and the address changes from process to process).
PANELS = _panels_cfunc.address


@intrinsic
def _call_raw(typingctx, fn, item, c, ldc, a, lda, w, k, bias, panel, p0, p1, r0, r1):
    """An opaque indirect call of ``fn(item, c, ..., r1)`` (13 intp arguments, no result)."""
    sig = types.void(*([types.intp] * 14))

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * 13)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def gemm_panels(fn, c, a, wp, bias, p0, p1, r0, r1):
    """``c[r, cols(p)] = bias[cols(p)] + a[r] @ W[:, cols(p)]`` for panels p0..p1, rows r0..r1.

    ``fn`` is :data:`PANELS`; ``c`` and ``a`` are 2-D with unit column stride (any row
    stride); ``wp`` is ``pack(W)``; ``c`` and ``bias`` have at least ``P * PANEL`` columns.
    """
    item = a.itemsize
    _call_raw(fn, item, c.ctypes.data, c.strides[0] // item, a.ctypes.data, a.strides[0] // item, wp.ctypes.data,
              a.shape[1], bias.ctypes.data, wp.shape[2], p0, p1, r0, r1)


def panel_width(dtype) -> int:
    """Columns per packed panel for ``dtype``."""
    return PANEL32 if np.dtype(dtype) == np.float32 else PANEL64


def padded(n: int, dtype) -> int:
    """``n`` rounded up to whole panels: the width of a result buffer."""
    width = panel_width(dtype)
    return -(-n // width) * width


def pack(weight: np.ndarray) -> np.ndarray:
    """``[K, N]`` -> ``[P, K, PANEL]`` column panels, zero-padded to whole panels (contiguous)."""
    k, n = weight.shape
    width = panel_width(weight.dtype)
    out = np.empty((padded(n, weight.dtype) // width, k, width), dtype=weight.dtype)
    whole = n // width  # full panels: one strided copy; then the zero-padded last one
    out[:whole] = weight[:, :whole * width].reshape(k, whole, width).transpose(1, 0, 2)
    if n > whole * width:
        out[whole] = 0
        out[whole, :, :n - whole * width] = weight[:, whole * width:]
    return out


def pad_bias(bias: np.ndarray | None, n: int, dtype) -> np.ndarray:
    """A bias (or zeros) padded to whole panels."""
    out = np.zeros(padded(n, dtype), dtype=dtype)
    if bias is not None:
        out[:n] = bias
    return out


#: Rows per prange chunk of :func:`matmul` (a multiple of ROWS).
CHUNK = 16 * ROWS
#: Below this many multiply-adds per step a kernel runs on one thread: a parallel launch
#: (about 1-2 us) would cost more than it saves.
PARALLEL_WORK = 1 << 19


@njit(cache=True, nogil=True)
def _matmul_part(fn, c, a, wp, bias, q, nth):
    """Thread q of nth of :func:`matmul`: its chunks of CHUNK rows, every panel."""
    m = a.shape[0]
    chunks = (m + CHUNK - 1) // CHUNK
    for chunk in range(q * chunks // nth, (q + 1) * chunks // nth):
        gemm_panels(fn, c, a, wp, bias, np.int64(0), wp.shape[0], chunk * CHUNK, min(m, (chunk + 1) * CHUNK))


@njit(cache=True, nogil=True, parallel=True)
def _matmul_into(fn, c, a, wp, bias, nth):
    for q in prange(nth):
        _matmul_part(fn, c, a, wp, bias, np.int64(q), nth)


def matmul(a: np.ndarray, wp: np.ndarray, bias: np.ndarray, nth: int | None = None) -> np.ndarray:
    """``a @ W + bias`` over whole panels: ``[M, P * PANEL]`` (the hoisted GEMM: M = T*B rows).

    ``nth`` None: :func:`threads_for` the whole product. ``nth`` 1 runs on the calling thread
    (no parallel region); more runs one parallel region under :func:`pool.region`.
    """
    c = np.empty((a.shape[0], wp.shape[0] * wp.shape[2]), dtype=a.dtype)
    if nth is None:
        nth = threads_for(a.shape[0], wp.shape[1] * c.shape[1])
    if a.strides[1] != a.itemsize:
        a = np.ascontiguousarray(a)
    if nth == 1:
        _matmul_part(PANELS, c, a, wp, bias, np.int64(0), np.int64(1))
    else:
        _pool.parallel(_matmul_into, PANELS, c, a, wp, bias, nth)
    return c


@njit(cache=True, nogil=True)
def _matmul_steps_part(fn, c, a, wp, bias, q, nth):
    """Thread q of nth of :func:`matmul_steps`: its time steps, every row and panel."""
    steps = a.shape[0]
    for t in range(q * steps // nth, (q + 1) * steps // nth):
        gemm_panels(fn, c[t], a[t], wp, bias, np.int64(0), wp.shape[0], np.int64(0), a.shape[1])


@njit(cache=True, nogil=True, parallel=True)
def _matmul_steps_into(fn, c, a, wp, bias, nth):
    for q in prange(nth):
        _matmul_steps_part(fn, c, a, wp, bias, np.int64(q), nth)


def matmul_steps(xs: np.ndarray, wp: np.ndarray, bias: np.ndarray, nth: int | None = None) -> np.ndarray:
    """The hoisted GEMM over every step: ``xs [T, B, K]`` -> ``[T, B, P * PANEL]``, without copying xs.

    ``xs`` may be a transposed view of batch-major inputs (rows of one step ``B`` apart):
    each step's ``B`` rows are multiplied in place at their stride. Where the ``T * B`` rows
    are evenly spaced (time-major, or ``B == 1``), or a step has fewer rows than one register
    block, it runs as one ``[T * B, K]`` product (:func:`matmul`), copying only in the latter case.
    """
    steps, rows, k = xs.shape
    width = wp.shape[0] * wp.shape[2]
    if xs.strides[2] != xs.itemsize:
        xs = np.ascontiguousarray(xs)
    if rows == 1 or xs.strides[0] == rows * xs.strides[1]:  # evenly spaced rows: one [T * B, K] view
        step = xs.strides[0] if rows == 1 else xs.strides[1]
        flat = np.lib.stride_tricks.as_strided(xs, (steps * rows, k), (step, xs.strides[2]))
        return matmul(flat, wp, bias, nth).reshape(steps, rows, width)
    if rows < ROWS:
        return matmul(np.ascontiguousarray(xs).reshape(steps * rows, k), wp, bias, nth).reshape(steps, rows, width)
    c = np.empty((steps, rows, width), dtype=xs.dtype)
    if nth is None:
        nth = threads_for(steps * rows, k * width)
    nth = min(nth, steps)
    if nth == 1:
        _matmul_steps_part(PANELS, c, xs, wp, bias, np.int64(0), np.int64(1))
    else:
        _pool.parallel(_matmul_steps_into, PANELS, c, xs, wp, bias, nth)
    return c


def compile_shared(dtype=np.float32) -> None:
    """Compile (or load from the on-disk cache) the GEMM entry points every kernel uses.

    :func:`gemm_panels` on contiguous and on strided (batch-major view) operands, through
    :func:`matmul` and :func:`matmul_steps`. Kernels pass the panel and row bounds as int64
    variables, never literal ints, so they share these compiled signatures. The parallel
    regions of both are compiled for the same operands without being started.
    """
    wp, bias = pack(np.zeros((8, 8), dtype)), pad_bias(None, 8, dtype)
    a, xs = np.zeros((8, 8), dtype), np.zeros((8, 2, 8), dtype).transpose(1, 0, 2)
    c = matmul(a, wp, bias, 1)
    c_steps = matmul_steps(xs, wp, bias, 1)
    _matmul_into.compile(tuple(map(typeof, (PANELS, c, a, wp, bias, 2))))
    _matmul_steps_into.compile(tuple(map(typeof, (PANELS, c_steps, xs, wp, bias, 2))))


def get_num_threads() -> int:
    """Threads a kernel call may use: Numba's thread count, 1 in a forked child that may not
    start a parallel region (:func:`cellgen.runtime.pool.max_threads`)."""
    return _pool.max_threads()


def threads_for(rows: int, work_per_row: int) -> int:
    """Threads for one kernel call split by rows: Numba's thread count, or 1 for small work."""
    if rows < 2 or rows * work_per_row < PARALLEL_WORK:
        return 1
    return int(get_num_threads())


#: Below this many multiply-adds per step a step loop runs on one thread: its two barriers
#: per step (about 0.1 us each with the cache lines they hand over) would cost more than
#: splitting the step saves (measured: H=32 LSTM at B=1 ran 1.4x slower on 2 threads, H=64
#: 0.87x, H=128 0.72x).
STEP_PARALLEL_WORK = 1 << 14


def threads_for_steps(rows: int, steps: int, work_per_row: int) -> int:
    """Threads for a step loop: each step's GEMMs split by column panels (so even one batch
    row splits), one parallel region per call (so the whole call's work must pay for it)."""
    step = rows * work_per_row
    if step < STEP_PARALLEL_WORK or steps * step < PARALLEL_WORK:
        return 1
    return int(get_num_threads())


def split_rows(rows: int, nth: int) -> bool:
    """Whether a step loop on nth threads splits by batch rows instead of column panels.

    By rows, each thread runs its own rows through every step: every panel of each GEMM,
    then its epilogues, with no barrier and nothing another core wrote (the rows of a batch
    are independent). It needs two register blocks (2 * ROWS rows) per thread; below that
    the GEMM panels split (one batch row still splits). Measured here (2 cores, against the
    panel split, interleaved): 0.97-1.0x at B=64 H=256 and B=256 H=128, 0.78-0.85x at
    B=64 H=128, 0.83-0.87x at B=32 H=256, and no loss with 4-16 MiB of weights per step
    (B=32-128, H=512-1024), which every core then streams from L3.
    """
    return nth > 1 and rows >= 2 * ROWS * nth


#: Bytes of hoisted-GEMM result a step loop keeps per thread when it computes it by blocks.
HOIST_BLOCK_BYTES = 1 << 19


def hoist_block(rows: int, nth: int, width: int, dtype) -> int:
    """Steps per block of the hoisted GEMM inside a step loop, or 0: computed up front.

    Each thread computes the hoisted rows of its own batch rows for ``tb`` steps, then runs
    those steps: the block (about HOIST_BLOCK_BYTES per thread) is read back from its cache
    instead of a ``[T, B, width]`` array in memory (S1 LSTM: 4% faster, S4: 9%). A thread
    with fewer than two register blocks of rows would run the micro-kernel on too few rows:
    then the whole GEMM runs up front (:func:`matmul_steps`).
    """
    nth = max(nth, 1)
    if rows // nth < 2 * ROWS:
        return 0
    return max(1, HOIST_BLOCK_BYTES // (-(-rows // nth) * width * np.dtype(dtype).itemsize))


#: Bytes of projection a fused scan keeps per thread (its ring of time slots): about half of
#: a 1 MiB L2, the rest holds the packed weight panels being streamed.
SCAN_BLOCK_BYTES = 1 << 19


def scan_unit_split(rows: int, units: int, steps: int, wp: np.ndarray) -> tuple[int, int]:
    """``(nth, tb)`` of a one-row fused scan split by units, or ``(1, 0)``: it does not split.

    With one batch row a scan cannot split by rows. Each thread takes whole column panels of
    every gate (``units`` must be a multiple of the panel width, and give each thread one)
    and projects them ``tb`` steps at a time as the rows of one GEMM block (a multiple of
    ROWS: full register blocks), keeping about SCAN_BLOCK_BYTES of ring per thread.
    """
    panels, k, pw = wp.shape
    nth = min(int(get_num_threads()), units // pw)
    if rows != 1 or units % pw or nth < 2 or steps * k * panels * pw < PARALLEL_WORK:
        return 1, 0
    row_bytes = panels * pw * wp.itemsize // nth
    return nth, max(ROWS, SCAN_BLOCK_BYTES // (2 * row_bytes) // ROWS * ROWS)


def scan_blocks(rows: int, nth: int, width: int, dtype) -> tuple[int, int]:
    """``(chunk, tb)`` of a fused scan: rows per block (a multiple of ROWS) and time steps per block.

    Each thread projects ``chunk`` of its batch rows for ``tb`` steps into a ring of ``2 * tb``
    slots (the previous block's last slot stays for a delayed input), then scans them.
    """
    row_bytes = width * np.dtype(dtype).itemsize
    per_thread = -(-rows // max(nth, 1))
    chunk = max(ROWS, min(per_thread, SCAN_BLOCK_BYTES // (2 * row_bytes)) // ROWS * ROWS)
    tb = max(1, SCAN_BLOCK_BYTES // (2 * chunk * row_bytes))
    return chunk, tb


# -- the backward's GEMMs over all T*B rows (training, docs/training.md) -----------------------------
#: Rows of K (the T*B steps-and-rows dimension) per block of :func:`matmul_tn`: a block's transposed
#: operand [M, KB] and packed d_gates panels stay in cache while the micro-kernel runs over them.
KB = 256


@njit(cache=True, nogil=True)
def _matmul_tn_part(fn, out, at, d, q, nth):
    """Thread q of nth of :func:`matmul_tn`: its column panels of ``out += at @ d`` (``at`` = a^T,
    [M, K] with unit column stride), KB rows of K at a time."""
    m, k_all = at.shape
    n = d.shape[1]
    pw = panel_width_of(d)
    panels = (n + pw - 1) // pw
    p0 = q * panels // nth
    p1 = (q + 1) * panels // nth
    if p1 <= p0:
        return
    width = (p1 - p0) * pw
    tmp = np.empty((m, width), dtype=at.dtype)
    zero = np.zeros(width, dtype=at.dtype)
    full = np.zeros((p1 - p0, KB, pw), dtype=d.dtype)  # one buffer for every whole block (no allocation per block)
    for k0 in range(0, k_all, KB):
        rows = min(KB, k_all - k0)
        dp = full if rows == KB else np.zeros((p1 - p0, rows, pw), dtype=d.dtype)
        for k in range(rows):
            src = d[k0 + k]
            for p in range(p0, p1):
                dst = dp[p - p0, k]
                c0 = p * pw
                if c0 + pw <= n:  # a whole panel: a fixed-length copy the compiler vectorizes
                    if pw == PANEL32:
                        for c in range(PANEL32):
                            dst[c] = src[c0 + c]
                    else:
                        for c in range(PANEL64):
                            dst[c] = src[c0 + c]
                else:
                    for c in range(n - c0):
                        dst[c] = src[c0 + c]
        gemm_panels(fn, tmp, at[:, k0:k0 + rows], dp, zero, np.int64(0), p1 - p0, np.int64(0), m)
        for i in range(m):
            for c in range(p0 * pw, min(n, p1 * pw)):
                out[i, c] += tmp[i, c - p0 * pw]


@njit(cache=True, nogil=True)
def panel_width_of(arr) -> int:
    """:func:`panel_width` inside compiled code."""
    return PANEL32 if arr.itemsize == 4 else PANEL64


@njit(cache=True, nogil=True, parallel=True)
def _matmul_tn_into(fn, out, at, d, nth):
    for q in prange(nth):
        _matmul_tn_part(fn, out, at, d, np.int64(q), nth)


def matmul_tn(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``a^T @ d`` for ``a`` [K, M], ``d`` [K, N] (K = all T*B rows: a weight's gradient, operands^T @
    d_gates) through the packed micro-kernel, threads splitting the column panels; Numba's threads,
    so the training step never wakes a second (BLAS) thread pool."""
    return matmul_tn_stacked([a], d)[0]


def matmul_tn_stacked(parts: list[np.ndarray], d: np.ndarray) -> list[np.ndarray]:
    """``[p^T @ d for p in parts]`` as ONE GEMM ``[p_0, p_1, ...]^T @ d``: the d_gates ``d`` are packed
    once for every left operand with the same K rows (a linear's hoisted and recurrent weights)."""
    d = d if d.strides[1] == d.itemsize else np.ascontiguousarray(d)
    k_all = d.shape[0]
    rows = [p.shape[1] for p in parts]
    m = sum(rows)
    out = np.zeros((m, d.shape[1]), dtype=d.dtype)
    panels = padded(d.shape[1], d.dtype) // panel_width(d.dtype)
    nth = min(threads_for(m, k_all * d.shape[1]), max(panels, 1))
    at = np.empty((m, k_all), dtype=d.dtype)
    r = 0
    for p in parts:
        block = at[r:r + p.shape[1]]
        if nth == 1:
            _transpose_part(block, p, np.int64(0), np.int64(1))
        else:
            _pool.parallel(_transpose_into, block, p, nth)
        r += p.shape[1]
    if nth == 1:
        _matmul_tn_part(PANELS, out, at, d, np.int64(0), np.int64(1))
    else:
        _pool.parallel(_matmul_tn_into, PANELS, out, at, d, nth)
    bounds = np.cumsum([0, *rows])
    return [out[bounds[i]:bounds[i + 1]] for i in range(len(parts))]


#: Rows and columns of a transposed tile (:func:`_transpose_part`): both tiles stay in L1.
TILE_T = 32


@njit(cache=True, nogil=True)
def _transpose_part(at, a, q, nth):
    """Thread q of nth: its share of ``at = a^T``, 32 x 32 tiles."""
    k_all, m = a.shape
    tiles = (k_all + TILE_T - 1) // TILE_T
    for tk in range(q * tiles // nth, (q + 1) * tiles // nth):
        k0 = tk * TILE_T
        k1 = min(k_all, k0 + TILE_T)
        for i0 in range(0, m, TILE_T):
            i1 = min(m, i0 + TILE_T)
            for k in range(k0, k1):
                for i in range(i0, i1):
                    at[i, k] = a[k, i]


@njit(cache=True, nogil=True, parallel=True)
def _transpose_into(at, a, nth):
    for q in prange(nth):
        _transpose_part(at, a, np.int64(q), nth)


def matmul_nt(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w^T`` (the inputs' adjoint, d_pre @ W_hoisted^T) through :func:`matmul`."""
    n = w.shape[0]
    return matmul(a, pack(np.ascontiguousarray(w.T)), np.zeros(padded(n, a.dtype), dtype=a.dtype))[:, :n]
