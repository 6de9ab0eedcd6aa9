"""Half-precision GEMMs in numba's CUDA simulator, against float64 NumPy on the rounded inputs.

Like ``cuda_sim_cases.py``, these run in a process of their own with ``NUMBA_ENABLE_CUDASIM=1``
(numba picks the simulator when ``numba.cuda`` is first imported; pytest does not collect this
file by itself): ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/cuda_sim_mma_cases.py``. On a
machine with an sm_80+ GPU the same file without the variable runs the real ``mma.sync`` (the
fragment layout on silicon) and the tensor-core GEMM, at twice the bound below (:data:`SLACK`).

What is checked: the simulator's emulation of the warp-level ``mma.sync.aligned.m16n8k16``
(:mod:`cellgen.backends.cuda.mma`) against NumPy, every lane packing its fragment by the PTX
ISA's element formulas (written out here again, independently of the module's table); the
GEMM's ``storage=`` interface (float16 and bfloat16 operands, float32 bias, output and
accumulation) at sizes that cross every tile edge (M, N, K not multiples of the tiles, several
blocks, several K tiles, transposed ``a``).

Tolerance: every product of two widened halves is exact in float32 (11 x 11 significant bits for
float16, 8 x 8 for bfloat16, both within float32's 24), so the only rounding is the float32
summation of K products and the bias: recursive summation's bound ``|err| <= (K + 1) u
(sum |a_ik w_kj| + |bias_j|)``, u = 2^-24 (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 4.4). :func:`_check` asserts that bound, element by element.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellgen.backends.cuda import gemm, mma, precision
from cellgen.backends.cuda import runtime as rt

U32 = 2.0 ** -24  # float32's unit roundoff
#: The bound's factor: 1 in the simulator (float32 round-to-nearest sums); 2 on a GPU, whose tensor cores
#: document only "at least float32" accumulation (room for truncating adds).
SLACK = 1 if rt.simulated() else 2
cuda = None  # numba.cuda (the simulator), bound by _mma_kernel: a kernel's global, which the simulator swaps


def _operands(rows: int, inner: int, cols: int, storage: str, seed: int, transpose_a: bool = False):
    """Host a [M, K] (or [K, M]) and w [K, N] held in ``storage``, their float64 values, a float32 bias."""
    rng = np.random.default_rng(seed)
    a = precision.to_storage(rng.standard_normal((inner, rows) if transpose_a else (rows, inner)), storage)
    w = precision.to_storage(rng.standard_normal((inner, cols)), storage)
    bias = rng.standard_normal(cols).astype(np.float32)
    values = [precision.from_storage(x, storage).astype(np.float64) for x in (a, w)]
    return a, w, bias, values


def _check(got: np.ndarray, a64: np.ndarray, w64: np.ndarray, bias: np.ndarray) -> float:
    """Assert the float32-summation bound element by element; the worst error as a fraction of it."""
    want = a64 @ w64 + bias
    scale = np.abs(a64) @ np.abs(w64) + np.abs(bias)
    bound = SLACK * (a64.shape[1] + 1) * U32 * scale
    assert got.dtype == np.float32 and got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound), float(np.max(err / bound))
    return float(np.max(err / bound))


def _isa_a(lane: int, i: int) -> tuple[int, int]:
    """PTX ISA, m16n8k16 floating point, A element a_i (i = 0..7) of ``lane``: (row, col)."""
    group, tig = lane >> 2, lane % 4
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 0x1) + (8 if i >= 4 else 0)
    return row, col


def _isa_b(lane: int, i: int) -> tuple[int, int]:
    """B element b_i (i = 0..3): (row k, col)."""
    group, tig = lane >> 2, lane % 4
    return tig * 2 + (i & 0x1) + (8 if i >= 2 else 0), group


def _isa_c(lane: int, i: int) -> tuple[int, int]:
    """C / D element c_i (i = 0..3): (row, col)."""
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 0x1)


def _fragments(a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Per lane: A's 8 and B's 4 elements (16-bit patterns, low to high) and C's 4, by the ISA's formulas."""
    fa = np.array([[a[_isa_a(lane, i)] for i in range(8)] for lane in range(32)], np.uint16)
    fb = np.array([[b[_isa_b(lane, i)] for i in range(4)] for lane in range(32)], np.uint16)
    fc = np.array([[c[_isa_c(lane, i)] for i in range(4)] for lane in range(32)], np.float32)
    return fa, fb, fc


def _mma_kernel(storage: str):
    """Each thread packs its lane's fragments (warp w reads operand set w) and stores its 4 D elements:
    the emulation in the simulator, the instruction itself on a GPU (this file without the variable)."""
    global cuda
    cuda = rt.numba_cuda()
    ops = mma.device_functions(cuda, rt.simulated(), storage)
    p, product = ops.pack, ops.mma  # closure constants (numba types functions, not a namespace)

    def kernel(fa, fb, fc, out):
        tid = cuda.threadIdx.x
        w, lane = tid // 32, tid % 32
        d = product(p(fa[w, lane, 0], fa[w, lane, 1]), p(fa[w, lane, 2], fa[w, lane, 3]),
                    p(fa[w, lane, 4], fa[w, lane, 5]), p(fa[w, lane, 6], fa[w, lane, 7]),
                    p(fb[w, lane, 0], fb[w, lane, 1]), p(fb[w, lane, 2], fb[w, lane, 3]),
                    fc[w, lane, 0], fc[w, lane, 1], fc[w, lane, 2], fc[w, lane, 3])
        for i in range(4):
            out[w, lane, i] = d[i]

    return cuda.jit(kernel)


@pytest.mark.parametrize("storage", precision.HALF)
def test_mma_emulation_matches_numpy(storage: str) -> None:
    # two warps, two different products (the emulation keeps warps apart); random values, so that a
    # wrong index shows; the bound: 16 exact products and C summed in float32
    rng = np.random.default_rng(3)
    sets = [tuple(rng.standard_normal(shape) for shape in ((16, 16), (16, 8), (16, 8))) for _ in range(2)]
    frags, wants = [], []
    for a, b, c in sets:
        a_bits, b_bits = mma.bits_of(a, storage), mma.bits_of(b, storage)
        c32 = c.astype(np.float32)
        frags.append(_fragments(a_bits, b_bits, c32))
        a64, b64 = (mma.widen(x, storage).astype(np.float64) for x in (a_bits, b_bits))
        wants.append((a64 @ b64 + c32, np.abs(a64) @ np.abs(b64) + np.abs(c32)))
    fa, fb, fc = (np.stack([f[i] for f in frags]) for i in range(3))
    out = np.zeros((2, 32, 4), np.float32)
    _mma_kernel(storage)[1, 64](fa, fb, fc, out)
    for w, (want, scale) in enumerate(wants):
        got = np.zeros((16, 8))
        for lane in range(32):
            for i in range(4):
                got[_isa_c(lane, i)] = out[w, lane, i]
        assert np.all(np.abs(got - want) <= SLACK * 17 * U32 * scale), np.max(np.abs(got - want) / scale)


def test_mma_layout_table_matches_the_isa_formulas() -> None:
    for lane in range(32):
        assert [mma.a_index(lane, r, h) for r in range(4) for h in range(2)] == [_isa_a(lane, i) for i in range(8)]
        assert [mma.b_index(lane, r, h) for r in range(2) for h in range(2)] == [_isa_b(lane, i) for i in range(4)]
        assert [mma.c_index(lane, i) for i in range(4)] == [_isa_c(lane, i) for i in range(4)]


def _gemm(rows: int, inner: int, cols: int, storage: str, transpose_a: bool, simt: bool = False) -> float:
    """One GEMM at these sizes (tensor cores, or the SIMT kernel) checked against float64; the worst
    error as a fraction of the bound."""
    a, w, bias, (a64, w64) = _operands(rows, inner, cols, storage, seed=rows + inner + cols, transpose_a=transpose_a)
    cuda = rt.numba_cuda()
    c = rt.empty((rows, cols), np.float32)
    args = (cuda.to_device(a), cuda.to_device(w), cuda.to_device(bias), c)
    if simt:
        grid = (rt.blocks(cols, gemm.TILE), rt.blocks(rows, gemm.TILE))
        gemm.kernel(np.float32, transpose_a, storage)[grid, gemm.BLOCK](*args)
    else:
        gemm.matmul(*args, transpose_a=transpose_a, storage=storage)
    return _check(c.copy_to_host(), a64.T if transpose_a else a64, w64, bias)


@pytest.mark.parametrize(("storage", "rows", "inner", "cols", "transpose_a"), [
    (s, *shape) for s in precision.HALF for shape in [
        (37, 45, 53, False),  # one block, 2 K tiles of 32 (the second 13 deep, odd), every edge ragged
        (70, 17, 5, False),  # two row blocks, one ragged K tile, 5 columns (in the first n8 tile)
        (1, 1, 66, False),  # one row, K = 1, two column blocks
        (5, 0, 7, False),  # K = 0: no K tile, c = bias
        (37, 20, 9, True),  # a given as [K, M]: the weight gradients' a^T @ w
    ]] + [
    ("float16", 70, 40, 66, False),  # 2 x 2 blocks, 2 K tiles: every block's edges (one storage: the
    ("bfloat16", 66, 45, 9, True),  # kernels differ in the MMA's type only); transposed, 2 row blocks
])
def test_tensor_core_gemm(storage: str, rows: int, inner: int, cols: int, transpose_a: bool) -> None:
    assert gemm.tensor_cores()  # the simulator runs the emulated MMA
    _gemm(rows, inner, cols, storage, transpose_a)


@pytest.mark.parametrize("storage", precision.HALF)
@pytest.mark.parametrize(("rows", "inner", "cols", "transpose_a"), [(37, 20, 70, False), (37, 20, 9, True)])
def test_simt_gemm_half_storage(storage: str, rows: int, inner: int, cols: int, transpose_a: bool) -> None:
    # the fallback for GPUs without m16n8k16 (before sm_80): loads widened to float32, SIMT FMAs
    _gemm(rows, inner, cols, storage, transpose_a, simt=True)


@pytest.mark.parametrize("storage", precision.HALF)
def test_hoisted_gemm_half_storage_allocates_float32(storage: str) -> None:
    steps, batch, size, width = 3, 5, 20, 9
    a, w, bias, (a64, w64) = _operands(steps * batch, size, width, storage, seed=7)
    cuda = rt.numba_cuda()
    xs = cuda.to_device(a.reshape(steps, batch, size))
    pre = gemm.hoisted_gemm(xs, cuda.to_device(w), cuda.to_device(bias), storage=storage)
    assert pre.shape == (steps, batch, width) and pre.dtype == np.float32
    _check(pre.copy_to_host().reshape(steps * batch, width), a64, w64, bias)


def test_half_storage_checks_the_operand_dtypes() -> None:
    cuda = rt.numba_cuda()
    a = cuda.to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="float16"):
        gemm.matmul(a, a, cuda.to_device(np.zeros(3, np.float32)), rt.empty((2, 3), np.float32), storage="float16")
    half = cuda.to_device(np.zeros((2, 3), np.float16))
    with pytest.raises(ValueError, match="bias and c float32"):
        gemm.matmul(half, half, cuda.to_device(np.zeros(3, np.float64)), rt.empty((2, 3), np.float32),
                    storage="float16")
    with pytest.raises(ValueError, match="storage must be"):
        gemm.matmul(a, a, cuda.to_device(np.zeros(3, np.float32)), rt.empty((2, 3), np.float32), storage="int8")
