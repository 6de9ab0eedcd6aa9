"""Half-precision GEMMs in numba's CUDA simulator, against float64 NumPy on the rounded inputs.

Like ``cuda_sim_cases.py``, these run in a process of their own with ``NUMBA_ENABLE_CUDASIM=1``
(numba picks the simulator when ``numba.cuda`` is first imported; pytest does not collect this
file by itself): ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/cuda_sim_mma_cases.py``.

What is checked: the GEMM's ``storage=`` interface (float16 and bfloat16 operands, float32 bias,
output and accumulation) at sizes that cross every tile edge (M, N, K not multiples of the
tiles, several blocks, several K tiles, transposed ``a``).

Tolerance: every product of two widened halves is exact in float32 (11 x 11 significant bits for
float16, 8 x 8 for bfloat16, both within float32's 24), so the only rounding is the float32
summation of K products and the bias: recursive summation's bound ``|err| <= (K + 1) u
(sum |a_ik w_kj| + |bias_j|)``, u = 2^-24 (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 4.4). :func:`_check` asserts that bound, element by element.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellgen.backends.cuda import gemm, precision
from cellgen.backends.cuda import runtime as rt

U32 = 2.0 ** -24  # float32's unit roundoff


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
    bound = (a64.shape[1] + 1) * U32 * scale
    assert got.dtype == np.float32 and got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound), float(np.max(err / bound))
    return float(np.max(err / bound))


@pytest.mark.parametrize("storage", precision.HALF)
@pytest.mark.parametrize(("rows", "inner", "cols", "transpose_a"), [
    (37, 45, 53, False),  # one block, 3 K tiles, every edge ragged
    (70, 17, 5, False),  # two row blocks, a 1-wide last K tile
    (1, 1, 66, False),  # one row, K = 1, two column blocks
    (37, 20, 9, True),  # a given as [K, M]: the weight gradients' a^T @ w
])
def test_matmul_half_storage(storage: str, rows: int, inner: int, cols: int, transpose_a: bool) -> None:
    a, w, bias, (a64, w64) = _operands(rows, inner, cols, storage, seed=rows + inner + cols, transpose_a=transpose_a)
    cuda = rt.numba_cuda()
    c = rt.empty((rows, cols), np.float32)
    gemm.matmul(cuda.to_device(a), cuda.to_device(w), cuda.to_device(bias), c, transpose_a=transpose_a,
                storage=storage)
    _check(c.copy_to_host(), a64.T if transpose_a else a64, w64, bias)


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
    with pytest.raises(ValueError, match="storage must be"):
        gemm.matmul(a, a, cuda.to_device(np.zeros(3, np.float32)), rt.empty((2, 3), np.float32), storage="int8")
