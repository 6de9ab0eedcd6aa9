"""Accuracy bound of the float32 kernels' rational tanh: within 1e-5 of float64, end to end.

No timing here (see docs/performance.md and ``cellgen bench``): only the numbers the fast
paths must keep.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import references as ref
import sympy
from numba import njit

from cellgen.build import build
from cellgen.codegen.printing import TANH_CLAMP, NumbaPrinter, rational_tanh

REPO = Path(__file__).resolve().parent.parent
SPECS = ("basic_rnn", "basic_lstm", "gru", "gru_cudnn", "lstm", "qrnn", "qrnn_f", "qrnn_ifo")
#: float64 arguments covering the saturated ends, the clamp and the steep middle.
GRID = np.concatenate([np.linspace(-20.0, 20.0, 400_001), np.linspace(-1e-3, 1e-3, 20_001),
                       [-np.inf, np.inf, -TANH_CLAMP, TANH_CLAMP, 0.0, -0.0]])


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> str:
    """Every shipped spec built into a temporary package (never the real generated/)."""
    root = tmp_path_factory.mktemp("fastmath")
    build([str(REPO / "specs" / f"{n}.py") for n in SPECS], root / "gen_fastmath")
    sys.path.insert(0, str(root))
    yield "gen_fastmath"
    sys.path.remove(str(root))


def test_rational_tanh_is_within_4e_7_of_float64_in_float32() -> None:
    x = sympy.Symbol("x", real=True)
    steps, result = rational_tanh(x)
    (low, _), (high, _), (square, square_expr), (poly, poly_expr) = steps
    assert low == high == x and square_expr == x * x
    f = sympy.lambdify((x, square), poly_expr, "numpy")
    v = np.clip(GRID, -TANH_CLAMP, TANH_CLAMP).astype(np.float32)
    y = np.where(v >= np.float32(TANH_CLAMP), np.float32(1), np.where(v <= np.float32(-TANH_CLAMP),
                                                                       np.float32(-1), f(v, v * v)))
    assert y.dtype == np.float32
    err = np.abs(y.astype(np.float64) - np.tanh(GRID))
    assert err.max() < 4e-7
    assert np.all(np.abs(y) <= 1.0)


def test_printed_helper_is_typed_float32() -> None:
    x = sympy.Symbol("x", real=True)
    steps, result = rational_tanh(x)
    text = NumbaPrinter("float32").doprint(steps[-1][1]) + NumbaPrinter("float32").doprint(result)
    assert "np.float32(" in text and "math." not in text
    assert NumbaPrinter("float32").doprint(steps[0][1]).startswith("(np.float32(-7.99")


def test_printed_helper_propagates_nan_and_saturates() -> None:
    x = sympy.Symbol("x", real=True)
    steps, result = rational_tanh(x)
    p = NumbaPrinter("float32")
    body = "".join(f"    {p.doprint(s)} = {p.doprint(e)}\n" for s, e in steps)
    namespace: dict = {"np": np}
    exec(f"def tanh(x):\n{body}    return {p.doprint(result)}\n", namespace)  # noqa: S102 - our printer's text
    kernel = njit(error_model="numpy")(namespace["tanh"])
    assert np.isnan(kernel(np.float32(np.nan)))
    assert kernel(np.float32(np.inf)) == 1.0 and kernel(np.float32(-np.inf)) == -1.0  # exactly, like np.tanh
    assert kernel(np.float32(50.0)) == 1.0 and kernel(np.float32(-50.0)) == -1.0


def test_generated_float32_tanh_helper(generated: str) -> None:
    mod = importlib.import_module(f"{generated}.basic_lstm")
    tanh = mod._tanh_float32

    @njit(error_model="numpy")
    def apply(v):
        out = np.empty_like(v)
        for i in range(v.size):
            out[i] = tanh(v[i])
        return out

    y = apply(GRID.astype(np.float32))
    assert y.dtype == np.float32
    assert np.abs(y.astype(np.float64) - np.tanh(GRID)).max() < 4e-7
    assert not hasattr(mod, "_tanh_float64")  # float64 kernels keep libm's tanh


@pytest.mark.parametrize("name", SPECS)
def test_float32_cpu_within_1e_5_of_float64_reference(generated: str, name: str) -> None:
    """Float32 kernels (rational tanh, packed GEMM) against the float64 oracle on the same numbers."""
    mod = importlib.import_module(f"{generated}.{name}")
    rng = np.random.default_rng(3)
    batch, steps, isize, units = 9, 40, 24, 32
    num_proj = 16 if name == "lstm" else None
    params64 = ref.random_params(name, isize, units, rng, np.float64, num_proj=num_proj)
    x64 = rng.standard_normal((batch, steps, isize))
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0] = steps
    sizes = {"num_proj": num_proj} if num_proj else {}
    init64 = tuple(0.5 * rng.standard_normal(s.shape)
                   for s in mod.zero_state(batch, units, dtype=np.float64, input_size=isize, **sizes))
    want_out, want_state = ref.dynamic_rnn(name, params64, x64, sequence_length=lengths, initial_state=init64)
    params32 = {k: v.astype(np.float32) for k, v in params64.items()}
    out, state = mod.dynamic_rnn(params32, x64.astype(np.float32), sequence_length=lengths,
                                 initial_state=tuple(s.astype(np.float32) for s in init64))
    assert out.dtype == np.float32
    assert np.abs(out - want_out).max() < 1e-5
    for got, want in zip(state, want_state, strict=True):
        assert np.abs(got - want).max() < 1e-5
