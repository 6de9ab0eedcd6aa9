"""backend="cuda" with float16 and bfloat16 storage (float32 arithmetic) in numba's simulator, against the
independent float64 references (tests/references.py) evaluated on the inputs, weights and initial states
*rounded to the storage dtype*.

Run like ``cuda_sim_cases.py``: ``test_cuda_backend.py::test_simulator_suite`` starts it in a process of its
own with ``NUMBA_ENABLE_CUDASIM=1`` (pytest does not collect it by itself).

The tolerance (docs/gpu.md, "Half precision"): with every stored value exact in the storage dtype and the
arithmetic float32, a result differs from the float64 reference by its final rounding to the storage
dtype, at most half an ulp (relative 2^-11 for float16, 2^-8 for bfloat16), plus what float32 arithmetic
adds (:data:`ATOL`). So ``|got - ref| <= RTOL * |ref| + ATOL``; measured (B=5, H=37, T=3, every spec and
path): ``max |got - ref| / (RTOL * |ref| + ATOL)`` is :data:`MEASURED` (0.929 float16, 0.976 bfloat16: the
bound is the rounding's own, so the margin is what float32 arithmetic leaves of ATOL). bfloat16 stores that
truncate instead of rounding to nearest even, or a reference on the unrounded inputs, exceed it (tested).
Training (``dynamic_rnn_vjp`` on half arrays: the float32 training on the storage values, gradients
rounded once) meets the same tolerance.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from references import bidirectional_dynamic_rnn, dynamic_rnn, random_params, state_sizes

from cellgen.backends.cuda import precision, steps

SPECS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.py"))
STEPPED = [name for name in SPECS if not name.startswith("qrnn")]  # qrnn*: one scan kernel, no step loop
STORAGE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: Half an ulp of the storage dtype, relative: the result's one rounding.
RTOL = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
#: What float32 arithmetic adds over a few steps (float32 eps 1.2e-7 times the sums of K <= 37 terms).
ATOL = 1e-5
#: The largest error measured over this file's forward cases, as a fraction of the tolerance (max |got - ref|:
#: float16 8.8e-4, bfloat16 5.7e-3, on values up to about 3): a result's rounding reaches nearly half an ulp.
#: The gradients (training): float16 0.894, bfloat16 0.984 of it.
MEASURED = {"float16": 0.929, "bfloat16": 0.976}
LSTM_HYPER = {"forget_bias": 0.7, "cell_clip": 0.6, "proj_clip": 0.4}


@pytest.fixture(autouse=True)
def _simt_gemm(request, monkeypatch) -> None:
    """The hoisted GEMM's SIMT kernel (same float32 accumulation, other summation order) for the cases here:
    the simulator emulates the tensor-core MMA a warp at a time, minutes for these sizes. Its own cases are
    tests/cuda_sim_mma_cases.py; the ``*tensor_cores*`` cases below run it end to end."""
    from cellgen.backends.cuda import gemm

    if "tensor_cores" not in request.node.name:
        monkeypatch.setattr(gemm, "tensor_cores", lambda: False)


def _module(name: str):
    return importlib.import_module(f"generated.{name}")


def _hyper(name: str) -> dict:
    return LSTM_HYPER if name == "lstm" else {}


def _case(name: str, storage: str, batch: int = 5, steps: int = 3, isize: int = 7, units: int = 37,
          seed: int = 0):
    """float64 draws (parameters, batch-major inputs, a random initial state, ragged lengths with 0 and T)
    and the same rounded to ``storage``."""
    rng = np.random.default_rng(seed)
    proj = 11 if name == "lstm" else None
    params = random_params(name, isize, units, rng, np.float64, num_proj=proj)
    inputs = rng.standard_normal((batch, steps, isize))
    state = tuple(rng.standard_normal((batch, n)) for n in state_sizes(name, units, isize, proj))
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0], lengths[-1] = steps, 0
    dtype = STORAGE[storage]
    return ({k: v.astype(dtype) for k, v in params.items()}, inputs.astype(dtype),
            tuple(s.astype(dtype) for s in state), lengths)


def _wide(tree):
    """Storage arrays as float64 (exact), through dicts and tuples."""
    if isinstance(tree, dict):
        return {k: _wide(v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(_wide(v) for v in tree)
    return np.asarray(tree).astype(np.float64)


def _fraction(got, want, storage: str) -> float:
    """``max |got - want| / (RTOL |want| + ATOL)``: at most 1 is within the tolerance."""
    got = np.asarray(got).astype(np.float64)
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want) / (RTOL[storage] * np.abs(want) + ATOL)))


def _within(got, want, storage: str) -> float:
    assert np.asarray(got).dtype == STORAGE[storage], (np.asarray(got).dtype, storage)
    assert np.asarray(got).shape == want.shape
    fraction = _fraction(got, want, storage)
    assert fraction <= 1, f"{storage}: error {fraction:.3f} of the tolerance"
    return fraction


def _run(name: str, storage: str, **kw):
    params, inputs, state, lengths = _case(name, storage, **kw)
    got = _module(name).dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend="cuda",
                                    **_hyper(name))
    want = dynamic_rnn(name, _wide(params), _wide(inputs), lengths, _wide(state), **_hyper(name))
    return got, want


def _check(name: str, storage: str, **kw) -> None:
    (out, final), (ref_out, ref_final) = _run(name, storage, **kw)
    _within(out, ref_out, storage)
    for got, want in zip(final, ref_final, strict=True):
        _within(got, want, storage)


#: Every spec in one storage dtype, the two alternating down the sorted list (the simulator is slow; the
#: kernels' structure does not depend on the storage dtype, only their loads and stores do, and every
#: other test here runs both dtypes): each spec and each dtype at least once.
SPEC_STORAGE = [(name, list(STORAGE)[k % len(STORAGE)]) for k, name in enumerate(SPECS)]


def test_every_spec_and_every_storage_dtype_is_checked() -> None:
    assert {n for n, _ in SPEC_STORAGE} == set(SPECS) and {s for _, s in SPEC_STORAGE} == set(STORAGE)


@pytest.mark.parametrize(("name", "storage"), SPEC_STORAGE)
def test_every_spec_matches_the_float64_reference(name: str, storage: str) -> None:
    steps.forget()
    _check(name, storage)
    assert steps.last_path() == ("persistent" if name in STEPPED else None)  # auto: the persistent kernel


@pytest.mark.parametrize(("name", "storage", "batch"), [
    ("lstm", "bfloat16", 5), ("gru_cudnn", "float16", 5), ("basic_lstm", "bfloat16", 18), ("basic_rnn", "float16", 18),
])
def test_per_step_launches(name: str, storage: str, batch: int) -> None:
    # B = 5: the _all kernels (one block over all rows); B = 18: the 32x4 blocks (5 row blocks)
    with steps.forced("launches"):
        _check(name, storage, batch=batch, steps=2 if batch < 16 else 1)
    assert steps.last_path() == "launches"


@pytest.mark.parametrize(("name", "storage", "time"), [("lstm", "float16", 3)])  # bfloat16: the grid test below
def test_tensor_core_persistent_kernel_over_chunks_and_row_groups(name: str, storage: str, time: int) -> None:
    # the persistent kernel's recurrent GEMMs on the (emulated) tensor cores: one simulated block keeps both
    # 32-unit chunks (37 units) and loops over 2 row groups of 16 (B = 18; rows 18-31 zero padding); lstm: a
    # second stage (the projection, 11 units: one chunk, K = 37 of a 64-row padded slice); odd T leaves a
    # double-buffered state in the second buffer
    steps.forget()
    with steps.forced("persistent"):
        _check(name, storage, batch=18, steps=time)
    assert steps.last_path() == "persistent"


def test_tensor_core_persistent_grid_splits_row_groups_of_16() -> None:
    # one step of a one-stage cell (exact with several simulated blocks, see cuda_sim_cases.py): 2 chunks x 2
    # row groups of 16 (B = 18) on 6 co-resident blocks -> 4 blocks, one (chunk, group) each (row groups of
    # 4, as the float32 kernel has, would take all 6)
    steps.forget()
    with steps.forced("persistent", simulated_blocks=6):
        _check("basic_lstm", "bfloat16", batch=18, steps=1)
    assert steps.last_path() == "persistent" and steps.last_grid() == 4


@pytest.mark.parametrize("storage", list(STORAGE))
def test_the_hoisted_gemm_on_tensor_cores(storage: str) -> None:
    """The forward with the hoisted GEMM on the (emulated) tensor cores: the same tolerance."""
    _check("basic_lstm", storage, batch=3, steps=2, isize=5, units=33)


def test_graph_mode_falls_back_to_the_launches() -> None:
    with steps.forced("graph"):
        _check("basic_rnn", "bfloat16", steps=2)
    assert steps.last_path() == "launches"  # the simulator cannot capture a graph


@pytest.mark.parametrize(("name", "storage", "time_major"),
                         [("basic_rnn", "float16", False), ("qrnn", "bfloat16", True)])
def test_bidirectional(name: str, storage: str, time_major: bool) -> None:
    params_fw, inputs, state, lengths = _case(name, storage, steps=3, seed=1)
    params_bw, *_ = _case(name, storage, steps=3, seed=2)
    if time_major:
        inputs = np.ascontiguousarray(inputs.transpose(1, 0, 2))
    (fw, bw), (sfw, sbw) = _module(name).bidirectional_dynamic_rnn(
        params_fw, params_bw, inputs, sequence_length=lengths, initial_state_fw=state, time_major=time_major,
        backend="cuda")
    (rfw, rbw), (rsfw, rsbw) = bidirectional_dynamic_rnn(name, _wide(params_fw), _wide(params_bw), _wide(inputs),
                                                         lengths, _wide(state), time_major=time_major)
    _within(fw, rfw, storage)
    _within(bw, rbw, storage)
    for got, want in zip((*sfw, *sbw), (*rsfw, *rsbw), strict=True):
        _within(got, want, storage)


def _to_device(a: np.ndarray, storage: str):
    from numba import cuda

    if storage == "bfloat16":
        return precision.bfloat16_device(cuda.to_device(a.view(np.uint16)))
    return cuda.to_device(a)


@pytest.mark.parametrize(("name", "storage"), [("basic_lstm", "float16"), ("qrnn", "bfloat16")])
def test_device_arrays_in_and_out(name: str, storage: str) -> None:
    from numba import cuda

    params, inputs, state, lengths = _case(name, storage, steps=3)
    dev_state = tuple(_to_device(s, storage) for s in state)
    out, final = _module(name).dynamic_rnn({k: _to_device(v, storage) for k, v in params.items()},
                                           _to_device(inputs, storage), sequence_length=cuda.to_device(lengths),
                                           initial_state=dev_state, backend="cuda")
    kind = precision.DeviceBfloat16 if storage == "bfloat16" else type(cuda.to_device(np.zeros(1)))
    assert isinstance(out, kind) and all(isinstance(s, kind) for s in final)
    ref_out, ref_final = dynamic_rnn(name, _wide(params), _wide(inputs), lengths, _wide(state))
    _within(out.copy_to_host(), ref_out, storage)
    for got, want in zip(final, ref_final, strict=True):
        _within(got.copy_to_host(), want, storage)
    for dev, initial in zip(dev_state, state, strict=True):  # the caller's states are not overwritten
        np.testing.assert_array_equal(dev.copy_to_host(), initial)


@pytest.mark.parametrize(("name", "storage"), [("lstm", "bfloat16")])  # float16 device arrays: the test above
def test_device_parameters_are_packed_on_the_device(name: str, storage: str, monkeypatch) -> None:
    """Half device parameters never cross to the host (widened, packed and rounded back on the device) and
    give the host parameters' numbers, bit for bit (the same float32 packing, the same one rounding)."""
    from numba import cuda

    params, inputs, state, lengths = _case(name, storage, steps=2)
    kw = dict(sequence_length=lengths, initial_state=state, backend="cuda", **_hyper(name))
    host_out, host_final = _module(name).dynamic_rnn(params, inputs, **kw)
    device = {k: _to_device(v, storage) for k, v in params.items()}
    arrays = {id(v.bits if isinstance(v, precision.DeviceBfloat16) else v) for v in device.values()}
    read: list[int] = []
    kind = type(cuda.to_device(np.zeros(1)))
    real = kind.copy_to_host

    def recording(self, *args, **kwargs):
        read.append(id(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kind, "copy_to_host", recording)
    out, final = _module(name).dynamic_rnn(device, inputs, **kw)
    assert read and not arrays & set(read)  # results were read back; no parameter was
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), np.asarray(host_out).view(np.uint16))
    for got, want in zip(final, host_final, strict=True):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_an_unmarked_uint16_device_array_is_never_read_as_bfloat16() -> None:
    from numba import cuda

    params, inputs, state, lengths = _case("basic_rnn", "bfloat16", steps=2)
    mod = _module("basic_rnn")
    with pytest.raises(ValueError, match=r"inputs is a uint16 device array.*bfloat16_device"):
        mod.dynamic_rnn(params, cuda.to_device(inputs.view(np.uint16)), backend="cuda")
    marked = precision.bfloat16_device(cuda.to_device(inputs.view(np.uint16)))
    unmarked = {k: cuda.to_device(v.view(np.uint16)) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"parameter '.*' must be bfloat16 like the inputs.*got a uint16"):
        mod.dynamic_rnn(unmarked, marked, backend="cuda")
    with pytest.raises(ValueError, match=r"parameter '.*' has dtype float32, expected bfloat16"):
        mod.dynamic_rnn({k: v.astype(np.float32) for k, v in params.items()}, inputs, backend="cuda")
    with pytest.raises(ValueError, match=r"initial_state.h must be bfloat16 like the inputs.*got a uint16"):
        mod.dynamic_rnn(params, inputs, initial_state=cuda.to_device(state[0].view(np.uint16)), backend="cuda")
    with pytest.raises(ValueError, match=r"initial_state.h has dtype int64, expected bfloat16 or float32 or float64"):
        mod.dynamic_rnn(params, inputs, initial_state=np.zeros(state[0].shape, np.int64), backend="cuda")


def _grad_pairs(g, g64) -> list:
    return [(g.inputs, g64.inputs), *((g.params[k], g64.params[k]) for k in g64.params),
            *zip(g.initial_state, g64.initial_state, strict=True)]


@pytest.mark.parametrize(("name", "storage"), [("basic_rnn", "bfloat16"), ("lstm", "float16")])
def test_training_in_half_matches_the_float64_gradients(name: str, storage: str) -> None:
    """dynamic_rnn_vjp on half arrays: its forward (the float32 training forward on the storage values) and
    every gradient, rounded to the storage dtype, are within the forward's tolerance of the float64 cpu
    backend's on the rounded values (measured: 0.894 of it in float16, 0.984 in bfloat16)."""
    params, inputs, state, lengths = _case(name, storage, steps=2, units=33)
    mod = _module(name)
    args = {"sequence_length": lengths, "initial_state": state, **_hyper(name)}
    (out, final), backward = mod.dynamic_rnn_vjp(params, inputs, backend="cuda", **args)
    ref_out, ref_final = dynamic_rnn(name, _wide(params), _wide(inputs), lengths, _wide(state), **_hyper(name))
    for got, want in zip((out, *final), (ref_out, *ref_final), strict=True):
        _within(got, want, storage)
    weights = np.random.default_rng(5).standard_normal(out.shape).astype(STORAGE[storage])
    g = backward(weights)
    wide_args = {**args, "initial_state": _wide(state)}
    (_, _), backward64 = mod.dynamic_rnn_vjp(_wide(params), _wide(inputs), **wide_args)
    g64 = backward64(_wide(weights))
    for got, want in _grad_pairs(g, g64):
        _within(got, want, storage)


def test_bidirectional_training_in_half() -> None:
    params_fw, inputs, state, lengths = _case("qrnn_f", "bfloat16", steps=2, seed=1)
    params_bw, *_ = _case("qrnn_f", "bfloat16", steps=2, seed=2)
    mod = _module("qrnn_f")
    args = {"sequence_length": lengths, "initial_state_fw": state}
    ((out_fw, out_bw), _), backward = mod.bidirectional_dynamic_rnn_vjp(params_fw, params_bw, inputs,
                                                                         backend="cuda", **args)
    rng = np.random.default_rng(6)
    d = tuple(rng.standard_normal(o.shape).astype(STORAGE["bfloat16"]) for o in (out_fw, out_bw))
    g = backward(d)
    (_, _), backward64 = mod.bidirectional_dynamic_rnn_vjp(_wide(params_fw), _wide(params_bw), _wide(inputs),
                                                           sequence_length=lengths, initial_state_fw=_wide(state))
    g64 = backward64(tuple(_wide(x) for x in d))
    pairs = [(g.inputs, g64.inputs), *((g.params_fw[k], g64.params_fw[k]) for k in g64.params_fw),
             *((g.params_bw[k], g64.params_bw[k]) for k in g64.params_bw),
             *zip((*g.initial_state_fw, *g.initial_state_bw), (*g64.initial_state_fw, *g64.initial_state_bw),
                  strict=True)]
    for got, want in pairs:
        _within(got, want, "bfloat16")


def test_training_in_half_takes_host_arrays() -> None:
    params, inputs, *_ = _case("gru", "float16", steps=2)
    with pytest.raises(ValueError, match=r"dynamic_rnn_vjp: inputs is a device array; half-precision training "
                                         r"takes host arrays"):
        _module("gru").dynamic_rnn_vjp(params, _to_device(inputs, "float16"), backend="cuda")


def test_empty_time() -> None:
    params, inputs, state, _ = _case("basic_lstm", "bfloat16", steps=0)
    out, final = _module("basic_lstm").dynamic_rnn(params, inputs, initial_state=state, backend="cuda")
    assert out.shape == (5, 0, 37) and out.dtype == STORAGE["bfloat16"]
    for got, initial in zip(final, state, strict=True):
        np.testing.assert_array_equal(got.view(np.uint16), initial.view(np.uint16))


# -- the tolerance can fail ------------------------------------------------------------------------------
def test_the_tolerance_sees_the_inputs_rounding() -> None:
    """The same call against the reference on the *unrounded* float64 draws: off by more than the tolerance
    (bfloat16 rounding of the inputs and weights is visible), so the tolerance is not loose."""
    params, inputs, state, lengths = _case("lstm", "bfloat16")
    out, _ = _module("lstm").dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state,
                                         backend="cuda", **LSTM_HYPER)
    rng = np.random.default_rng(0)  # the draws _case rounded
    raw = random_params("lstm", 7, 37, rng, np.float64, num_proj=11)
    raw_inputs = rng.standard_normal(inputs.shape)
    raw_state = tuple(rng.standard_normal(s.shape) for s in state)
    want, _ = dynamic_rnn("lstm", raw, raw_inputs, lengths, raw_state, **LSTM_HYPER)
    assert _fraction(out, want, "bfloat16") > 1


@pytest.mark.parametrize("storage", list(STORAGE))
def test_the_tolerance_sees_an_operand_rounded_once(storage: str, monkeypatch) -> None:
    """The persistent kernel's tensor-core GEMM with the operand's remainder dropped (the float32 operand
    rounded once to the storage dtype, as an MMA of the rounded operand alone would be): caught. The kernel
    issues each tile's MMAs in pairs, the rounded part then the remainder; the wrapper still makes every
    emulated call (its block barriers) and discards the second of each pair. Measured (B=5, H=37, T=3):
    3-51x the tolerance over the stepped specs with the remainder dropped, at most 0.97 with it."""
    import threading

    mod = _module("basic_rnn")
    mod._cuda_kernels(storage)  # binds the MMAs: then wrap the one of this storage dtype
    name = "_mma_f16" if storage == "float16" else "_mma_bf16"
    real, calls = getattr(mod, name), threading.local()  # the simulator's threads are Python threads

    def rounded_part_only(*args):
        n = getattr(calls, "n", 0)
        calls.n = n + 1
        d = real(*args)
        return d if n % 2 == 0 else tuple(args[6:])

    monkeypatch.setattr(mod, name, rounded_part_only)
    with steps.forced("persistent"):
        (out, _), (want, _) = _run("basic_rnn", storage)
    assert steps.last_path() == "persistent"
    assert _fraction(out, want, storage) > 1


def test_the_tolerance_sees_a_truncating_store(monkeypatch) -> None:
    """bfloat16 stores that truncate (round toward zero) instead of rounding to nearest even: caught."""
    mod = _module("gru")
    mod._cuda_kernels("bfloat16")  # binds the conversions: then replace the rounding one

    def truncate(x):
        return np.uint16(np.array([x], dtype=np.float32).view(np.uint32)[0] >> np.uint32(16))

    monkeypatch.setattr(mod, "_f32_to_bf16", truncate)
    (out, _), (want, _) = _run("gru", "bfloat16", steps=3)
    assert _fraction(out, want, "bfloat16") > 1


# -- the differential fuzzer's random specs in half -----------------------------------------------------
def _random_spec_in_bfloat16(fz, folder: Path) -> None:
    """One drawn spec on backend="cuda" in bfloat16 storage against the fuzzer's float64 evaluator of its
    equations, on the draws rounded to bfloat16: the same tolerance as the shipped specs."""
    from fuzz_specs import Evaluator, build_spec, load_cell, random_inputs

    path, module = build_spec(fz.text, folder)
    ev = Evaluator(load_cell(path), fz.input_size, fz.num_units, fz.sizes)
    params, inputs, lengths, initial = random_inputs(ev, fz, np.dtype(np.float64))
    dtype = STORAGE["bfloat16"]
    params = {k: v.astype(dtype) for k, v in params.items()}
    inputs, initial = inputs.astype(dtype), [s.astype(dtype) for s in initial]
    want_out, want_states = ev.dynamic_rnn(_wide(params), _wide(inputs), lengths, _wide(initial), fz.hyper)
    out, final = module.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=module.State(*initial),
                                    backend="cuda", **fz.hyper)
    _within(out, want_out, "bfloat16")
    for got, want in zip(final, want_states, strict=True):
        _within(got, want, "bfloat16")


def test_random_specs_in_bfloat16(tmp_path_factory) -> None:
    """A sample of the differential fuzzer's random specs in bfloat16 storage (CELLGEN_FUZZ_CUDA_EXAMPLES,
    default 4): the per-step kernels with their separate epilogue kernels, which no shipped spec has (the
    default draws all take that path; a spec that fuses every stage would take the persistent kernel).
    Measured on the default draws: at most 0.95 of the tolerance. bfloat16: float32's range, where a random
    spec's values may leave float16's (65504)."""
    from cuda_sim_cases import _on_random_specs

    _on_random_specs(3, "fuzz_cuda_bf16", _random_spec_in_bfloat16, tmp_path_factory)
