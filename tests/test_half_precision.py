"""Half-precision storage, host side (no simulator, no GPU): the conversions of
:mod:`cellgen.backends.cuda.precision` against ml_dtypes and a float64 rounding, the kernels' storage
variants as printed, the persistent kernel's fit at two bytes an element, and the clear errors where
float16 / bfloat16 cannot run. The numbers in the simulator: tests/cuda_sim_half_cases.py."""

from __future__ import annotations

import importlib
import sys

import ml_dtypes
import numpy as np
import pytest

from cellgen.backends.cuda import precision
from cellgen.backends.cuda.steps import StageShape, persistent_grid, shared_bytes


def _special_floats() -> np.ndarray:
    """float32 values that exercise the rounding: ties (odd and even), just off ties, the largest values,
    subnormals, signed zeros, infinities, NaNs, and random values over the whole exponent range."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, size=20000, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(0, 2 ** 16, 97, dtype=np.uint32) << np.uint32(16)) | np.uint32(0x8000)
    near = np.concatenate([ties - np.uint32(1), ties + np.uint32(1)])
    values = np.concatenate([bits, ties, near]).view(np.float32)
    extra = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, 1.1754942e-38],
                     dtype=np.float32)
    return np.concatenate([values, extra])


def test_bf16_rounding_matches_ml_dtypes() -> None:
    x = _special_floats()
    got = precision.bf16_from_f32(x)
    finite = ~np.isnan(x)
    want = x[finite].astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(got[finite], want)
    assert np.all(np.isnan(precision.f32_from_bf16(got[~finite])))  # NaN stays NaN (quiet bit set)


def test_bf16_rounding_is_nearest_even_in_float64() -> None:
    """An independent rounding: the two bfloat16 neighbours of each finite value, computed in float64, and
    the nearer one taken (ties to the even pattern)."""
    x = _special_floats()
    x = x[np.isfinite(x) & (np.abs(x) < 3.38e38)]  # below the largest bfloat16 + half an ulp: no overflow
    low = (x.view(np.uint32) & np.uint32(0xFFFF0000)).astype(np.uint32)
    high = low + np.uint32(0x10000)
    lo, hi = (v.view(np.float32).astype(np.float64) for v in (low, high))
    d_lo, d_hi = np.abs(x.astype(np.float64) - lo), np.abs(hi - x.astype(np.float64))
    even_low = ((low >> np.uint32(16)) & np.uint32(1)) == 0
    pick_low = (d_lo < d_hi) | ((d_lo == d_hi) & even_low)
    want = np.where(pick_low, low, high) >> np.uint32(16)
    np.testing.assert_array_equal(precision.bf16_from_f32(x), want.astype(np.uint16))


def test_bf16_widening_is_exact() -> None:
    patterns = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    got = precision.f32_from_bf16(patterns)
    want = patterns.view(ml_dtypes.bfloat16).astype(np.float32)
    same = np.isnan(got) == np.isnan(want)
    assert same.all()
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_the_simulator_conversions_are_the_host_ones() -> None:
    convert = precision.device_functions(None, simulated=True)
    x = _special_floats()[::50]
    for v in x[np.isfinite(x)]:
        assert convert.f32_to_bf16(v) == precision.bf16_from_f32(np.array([v]))[0]
        assert convert.bf16_to_f32(convert.f32_to_bf16(v)) == precision.f32_from_bf16(
            precision.bf16_from_f32(np.array([v])))[0]


def test_storage_round_trips() -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    for storage, dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        held = precision.to_storage(x, storage)
        assert held.dtype == precision.device_dtype(storage)
        np.testing.assert_array_equal(precision.from_storage(held, storage), x.astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(precision.to_storage(x.astype(dtype), storage), held)  # exact: a view
    assert precision.device_storage(np.uint16) == "bfloat16" and precision.device_storage(np.float16) == "float16"
    assert precision.storage_name(ml_dtypes.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="stores float32, float64, float16 or bfloat16, got int8"):
        precision.storage_name(np.int8)


def test_bfloat16_device_is_an_explicit_opt_in() -> None:
    class Fake:  # a __cuda_array_interface__ exporter of some dtype
        __cuda_array_interface__: dict = {}

        def __init__(self, dtype) -> None:
            self.dtype, self.shape = np.dtype(dtype), (2,)

    marked = precision.bfloat16_device(Fake(np.uint16))
    assert marked.dtype == np.uint16 and marked.shape == (2,) and precision.bfloat16_device(marked) is marked
    with pytest.raises(ValueError, match="uint16 device array of bfloat16 bit patterns, got dtype float16"):
        precision.bfloat16_device(Fake(np.float16))
    with pytest.raises(ValueError, match="takes a uint16 device array, got ndarray"):
        precision.bfloat16_device(np.zeros(2, np.uint16))


# -- the kernels as generated ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lstm", "qrnn"])
def test_every_module_has_half_forward_variants_and_no_half_training(name: str) -> None:
    mod = importlib.import_module(f"generated.{name}")
    assert set(mod._CUDA_SOURCES) == {"float32", "float64", "float16", "bfloat16"}
    forward = {k for k in mod._CUDA_SOURCES["float32"] if not k.startswith(("train_", "backward"))}
    for storage in precision.HALF:
        assert set(mod._CUDA_SOURCES[storage]) == forward
    assert {"out", "xs"} <= set(mod._CUDA_STORAGE_ARGS)


def test_half_kernels_widen_loads_and_round_stores() -> None:
    import inspect

    mod = importlib.import_module("generated.lstm")
    bf16 = inspect.getsource(mod._CUDA_SOURCES["bfloat16"]["stage0"])
    f16 = inspect.getsource(mod._CUDA_SOURCES["float16"]["stage0"])
    f32 = inspect.getsource(mod._CUDA_SOURCES["float32"]["stage0"])
    assert "_bf16_to_f32(w_rec0[_k, _gc0])" in bf16 and "np.float32(w_rec0[_k, _gc0])" in f16
    assert "_bf16_to_f32" not in f32 and "np.float32(w_rec0" not in f32
    stage1 = inspect.getsource(mod._CUDA_SOURCES["bfloat16"]["stage1"])
    assert "out_t[b, j] = _f32_to_bf16(" in stage1
    persistent = inspect.getsource(mod._CUDA_SOURCES["bfloat16"]["persistent"])
    # the persistent kernel: bfloat16 patterns packed in pairs into its slices, the float32 operand rounded
    # (and its remainder rounded) into MMA operands, the outputs rounded as they are stored
    assert "cuda.shared.array(0, _nb_uint32)" in persistent and "_bf16_to_f32(_sw[" not in persistent
    assert "_lo = w_rec0[_k2, _gcol] if" in persistent  # bits as they are: no widening on the way in
    assert "_mma_pack(_f32_to_bf16(_v0_0), _f32_to_bf16(_v0_1))" in persistent
    assert "_f32_to_bf16(_v0_0 - _bf16_to_f32(_f32_to_bf16(_v0_0)))" in persistent
    assert "out_t[b, j] = _f32_to_bf16(" in persistent
    f16p = inspect.getsource(mod._CUDA_SOURCES["float16"]["persistent"])
    assert "_lo = _f16_bits(w_rec0[_k2, _gcol]) if" in f16p
    assert "_f16_bits(np.float16(_v0_0 - np.float32(np.float16(_v0_0))))" in f16p


# -- the persistent kernel's fit ------------------------------------------------------------------------
def test_half_weight_slices_fit_twice_the_units() -> None:
    """basic_lstm H=768 (24 chunks of 32 units, a 768 x 128 slice a block): 384 KiB in float32, 192 KiB in
    half storage, under 90% of the H100/H200's 227 KiB a block, not of the A100's 163 KiB."""
    lstm768 = [StageShape(768, 768, 128)]
    assert shared_bytes(lstm768, 24, 2) == 196608
    assert persistent_grid(lstm768, 4, 132, 232448) is None
    assert persistent_grid(lstm768, 2, 132, 232448) == (24, 196608)
    assert persistent_grid(lstm768, 2, 108, 166912) is None


def test_show_says_half_storage_goes_persistent_where_float32_does_not() -> None:
    from pathlib import Path

    from cellgen.backends.cuda import steps
    from cellgen.backends.cuda.layout import cuda_layout
    from cellgen.build import compile_spec

    plan = compile_spec(Path(__file__).resolve().parent.parent / "specs" / "basic_lstm.py")[1]
    lines = steps.describe(cuda_layout(plan), 64, {sym: 768 for sym in plan.spec.all_sizes})
    by_dtype = {line.split(":")[0]: line for line in lines[1:]}
    assert "CUDA graph" in by_dtype["GPU step loop (float32, H100/H200)"]
    # 24 chunks x 4 row groups of 16 (B = 64): 96 blocks (row groups of 4 would give 120)
    assert "persistent, 96 blocks of 32x4, 192 KiB" in by_dtype["GPU step loop (float16/bfloat16, H100/H200)"]
    assert "CUDA graph" in by_dtype["GPU step loop (float16/bfloat16, A100)"]
    # the static tiles count: gru_cudnn H=768's 144 KiB slices fit 90% of an A100's 163 KiB less 0.5 KiB (the
    # float32 kernel's operand tile), not less the half kernel's 11 KiB of operand and accumulator tiles
    from cellgen.backends.cuda.layout import cuda_layout as layout_of

    gru = compile_spec(Path(__file__).resolve().parent.parent / "specs" / "gru_cudnn.py")[1]
    p = layout_of(gru).persistent
    assert p.static_shared(2) == 4 * 16 * (2 * 36 + 3 * 32 + 8) == 11264  # hi/lo [16][36] words, [16][3*32 + 8]
    assert p.static_shared(4) == 512 and p.group_rows(2) == 16
    gru_lines = {line.split(":")[0]: line for line in
                 steps.describe(layout_of(gru), 64, {sym: 768 for sym in gru.spec.all_sizes})[1:]}
    assert "CUDA graph (the weight slices need 144 KiB" in gru_lines["GPU step loop (float16/bfloat16, A100)"]
    assert "persistent" in gru_lines["GPU step loop (float16/bfloat16, H100/H200)"]


# -- clear errors --------------------------------------------------------------------------------------
def _lstm_call(dtype):
    sys.path.insert(0, "tests")
    from references import random_params

    rng = np.random.default_rng(0)
    params = {k: v.astype(dtype) for k, v in random_params("basic_lstm", 3, 4, rng, np.float32).items()}
    return importlib.import_module("generated.basic_lstm"), params, rng.standard_normal((2, 3, 3)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_the_cpu_backend_refuses_half_with_where_it_runs(dtype) -> None:
    mod, params, inputs = _lstm_call(dtype)
    name = np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"inputs must be float32 or float64, got {name}; "
                                         r"float16/bfloat16 run on backend='cuda'"):
        mod.dynamic_rnn(params, inputs)
    mod, params, inputs = _lstm_call(np.float32)
    state = (np.zeros((2, 4), dtype), np.zeros((2, 4), dtype))
    with pytest.raises(ValueError, match=rf"initial_state.c must be float32 or float64, got {name}; float16/bfloat16"):
        mod.dynamic_rnn(params, inputs, initial_state=state)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_training_on_the_host_backends_refuses_half_inputs(backend: str) -> None:
    mod, params, inputs = _lstm_call(ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match=rf"dynamic_rnn_vjp: inputs must be float32 or float64 on backend="
                                         rf"'{backend}', got bfloat16 \(float16/bfloat16 run on backend='cuda'"):
        mod.dynamic_rnn_vjp(params, inputs, backend=backend)
    with pytest.raises(ValueError, match=r"bidirectional_dynamic_rnn_vjp: inputs must be float32 or float64"):
        mod.bidirectional_dynamic_rnn_vjp(params, params, inputs, backend=backend)


def test_half_training_checks_the_parameters_dtype() -> None:
    mod, params, inputs = _lstm_call(np.float16)
    params["kernel"] = params["kernel"].astype(np.float32)
    with pytest.raises(ValueError, match=r"parameter 'kernel' has dtype float32, expected float16 "
                                         r"\(the inputs' dtype\)"):
        mod.dynamic_rnn_vjp(params, inputs, backend="cuda")
