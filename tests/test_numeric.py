"""Numeric: every shipped spec x backend x dtype against the independent NumPy oracle (references.py)."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest
import references as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellgen

SPECS = ("basic_rnn", "basic_lstm", "gru", "gru_cudnn", "lstm", "qrnn", "qrnn_f", "qrnn_ifo")
BACKENDS = ("cpu", "reference")
DTYPES = (np.float32, np.float64)
TOL = {np.float32: 1e-5, np.float64: 1e-10}
IN, H, P = 5, 4, 3  # input_size, num_units, num_proj (all different, so a mixed-up size shows)
#: Hyperparameters away from their defaults, with clips small enough to engage.
HYPER = {"basic_lstm": {"forget_bias": 0.3}, "lstm": {"forget_bias": 0.7, "cell_clip": 0.4, "proj_clip": 0.15}}


def module(name: str) -> ModuleType:
    return importlib.import_module(f"generated.{name}")


def num_proj(name: str) -> int | None:
    return P if name == "lstm" else None


def sizes(name: str) -> dict[str, int]:
    """The extra size keywords a generated module takes."""
    return {"num_proj": P} if name == "lstm" else {}


def setup(name: str, dtype, batch: int = 6, steps: int = 7, seed: int = 0):
    """Oracle parameters (TF names), inputs [B, T, I], ragged lengths (with a 0 and a full one), a state."""
    rng = np.random.default_rng(seed)
    params = ref.random_params(name, IN, H, rng, dtype, num_proj=num_proj(name))
    inputs = rng.standard_normal((batch, steps, IN)).astype(dtype)
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0], lengths[-1] = steps, 0
    state = tuple(rng.standard_normal((batch, n)).astype(dtype)
                  for n in ref.state_sizes(name, H, IN, num_proj(name)))
    return params, inputs, lengths, state


def assert_close(actual, expected, dtype) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == np.dtype(dtype)
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype])


def assert_states_close(actual, expected, dtype) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SPECS)
def test_dynamic_rnn_matches_reference(name: str, backend: str, dtype) -> None:
    m = module(name)
    params, inputs, lengths, state = setup(name, dtype)
    hyper = HYPER.get(name, {})
    want_out, want_state = ref.dynamic_rnn(name, params, inputs, lengths, state, **hyper)
    out, final = m.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend=backend,
                               **hyper)
    assert isinstance(final, m.State)
    assert_close(out, want_out, dtype)
    assert_states_close(final, want_state, dtype)
    assert not np.any(out[-1]), "outputs past the sequence length are zero"

    # time-major inputs and outputs, default initial state and full lengths
    want_out, want_state = ref.dynamic_rnn(name, params, inputs.transpose(1, 0, 2), time_major=True, **hyper)
    out, final = m.dynamic_rnn(params, inputs.transpose(1, 0, 2), time_major=True, backend=backend, **hyper)
    assert_close(out, want_out, dtype)
    assert_states_close(final, want_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SPECS)
def test_bidirectional_matches_reference(name: str, backend: str, dtype) -> None:
    m = module(name)
    params_fw, inputs, lengths, state_fw = setup(name, dtype, seed=1)
    params_bw, _, _, state_bw = setup(name, dtype, seed=2)
    hyper = HYPER.get(name, {})
    (want_fw, want_bw), (want_sfw, want_sbw) = ref.bidirectional_dynamic_rnn(
        name, params_fw, params_bw, inputs, lengths, state_fw, state_bw, **hyper)
    (out_fw, out_bw), (sfw, sbw) = m.bidirectional_dynamic_rnn(
        params_fw, params_bw, inputs, sequence_length=lengths, initial_state_fw=state_fw,
        initial_state_bw=state_bw, backend=backend, **hyper)
    assert_close(out_fw, want_fw, dtype)
    assert_close(out_bw, want_bw, dtype)
    assert_states_close(sfw, want_sfw, dtype)
    assert_states_close(sbw, want_sbw, dtype)


@pytest.mark.parametrize(("batch", "threads", "by_rows"), [(26, 1, False), (26, 2, False), (26, 2, True),
                                                      (1, 2, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["basic_lstm", "gru", "lstm"])
def test_step_loop_layouts_match_reference(name: str, dtype, batch: int, threads: int, by_rows: bool,
                                           monkeypatch) -> None:
    """The step loop's layouts: the hoisted GEMM by blocks of steps (gemm.hoist_block) with
    several blocks and a partial last one, on 1 and 2 threads, split by column panels or by
    batch rows (gemm.split_rows), and one batch row split over 2 threads (GEMM panels split,
    one thread's epilogue rows empty); batch-major (rows of a step strided) and time-major
    inputs."""
    from cellgen.backends.cpu import gemm

    if threads == 2 and batch > 1:
        assert gemm.split_rows(batch, 2)  # 26 rows: by rows unless told otherwise
    if not by_rows:
        monkeypatch.setattr(gemm, "split_rows", lambda rows, nth: False)
    m = module(name)
    steps = 11
    params, inputs, lengths, state = setup(name, dtype, batch=batch, steps=steps, seed=3)
    if batch == 1:  # setup gives row 0 a length of 0 when it is also the last row
        lengths[0] = steps - 2
    width = gemm.padded(3 * H if name == "gru" else 4 * H, dtype)
    monkeypatch.setattr(gemm, "HOIST_BLOCK_BYTES", 3 * batch * width * np.dtype(dtype).itemsize)  # tb = 3 (1 thread)
    for knob in ("PARALLEL_WORK", "STEP_PARALLEL_WORK"):
        monkeypatch.setattr(gemm, knob, 0 if threads == 2 else 1 << 62)
    assert gemm.threads_for_steps(batch, steps, 1) == min(threads, gemm.get_num_threads())
    if batch > 1:
        assert 0 < gemm.hoist_block(batch, threads, width, dtype) < steps
    hyper = HYPER.get(name, {})
    want_out, want_state = ref.dynamic_rnn(name, params, inputs, lengths, state, **hyper)
    out, final = m.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, **hyper)
    assert_close(out, want_out, dtype)
    assert_states_close(final, want_state, dtype)
    out, final = m.dynamic_rnn(params, inputs.transpose(1, 0, 2).copy(), sequence_length=lengths,
                               initial_state=state, time_major=True, **hyper)
    assert_close(out, want_out.transpose(1, 0, 2), dtype)
    assert_states_close(final, want_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["qrnn", "qrnn_f", "qrnn_ifo"])
def test_one_row_scan_split_by_units_matches_reference(name: str, dtype, monkeypatch) -> None:
    """A one-row scan on 2 threads splits by units (gemm.scan_unit_split): 3 column panels
    per gate, so the threads get 1 and 2; the projection by blocks of ROWS steps, the last
    one partial; a length short of T; batch-major and time-major inputs."""
    from cellgen.backends.cpu import gemm

    m = module(name)
    units, steps = 3 * gemm.panel_width(dtype), 11
    rng = np.random.default_rng(5)
    params = ref.random_params(name, IN, units, rng, dtype)
    inputs = rng.standard_normal((1, steps, IN)).astype(dtype)
    lengths = np.array([steps - 2])
    state = tuple(rng.standard_normal((1, n)).astype(dtype) for n in ref.state_sizes(name, units, IN, None))
    monkeypatch.setattr(gemm, "PARALLEL_WORK", 0)
    monkeypatch.setattr(gemm, "SCAN_BLOCK_BYTES", 0)
    packed = gemm.pack(m._pack(params, {"input_size": IN, "num_units": units})[0])
    assert gemm.scan_unit_split(1, units, steps, packed) == (2, gemm.ROWS)
    want_out, want_state = ref.dynamic_rnn(name, params, inputs, lengths, state)
    out, final = m.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state)
    assert_close(out, want_out, dtype)
    assert_states_close(final, want_state, dtype)
    out, final = m.dynamic_rnn(params, inputs.transpose(1, 0, 2).copy(), sequence_length=lengths,
                               initial_state=state, time_major=True)
    assert_close(out, want_out.transpose(1, 0, 2), dtype)
    assert_states_close(final, want_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_rnn_three_mixed_layers(backend: str, dtype) -> None:
    rng = np.random.default_rng(3)
    # input 5 -> lstm (num_units 4, num_proj 3) -> gru (3 -> 6) -> qrnn (6 -> 2)
    p_lstm = ref.random_params("lstm", IN, H, rng, dtype, num_proj=P)
    p_gru = ref.random_params("gru", P, 6, rng, dtype)
    p_qrnn = ref.random_params("qrnn", 6, 2, rng, dtype)
    lstm_hyper = {"cell_clip": 0.5}
    inputs = rng.standard_normal((4, 6, IN)).astype(dtype)
    lengths = np.array([6, 0, 3, 5])
    init = (None, (rng.standard_normal((4, 6)).astype(dtype),), None)
    want_out, want_states = ref.multi_rnn(
        [("lstm", p_lstm, lstm_hyper), ("gru", p_gru, {}), ("qrnn", p_qrnn, {})], inputs, lengths, init)
    out, states = cellgen.multi_rnn(
        [(module("lstm"), p_lstm, lstm_hyper), (module("gru"), p_gru), (module("qrnn"), p_qrnn)], inputs,
        sequence_length=lengths, initial_states=init, backend=backend)
    assert_close(out, want_out, dtype)
    assert len(states) == 3
    for got, want in zip(states, want_states, strict=True):
        assert_states_close(got, want, dtype)

    # time-major
    want_out, _ = ref.multi_rnn([("gru", p_gru, {}), ("qrnn", p_qrnn, {})], inputs[..., :P].transpose(1, 0, 2),
                                lengths, time_major=True)
    out, _ = cellgen.multi_rnn([(module("gru"), p_gru), (module("qrnn"), p_qrnn)],
                               inputs[..., :P].transpose(1, 0, 2), sequence_length=lengths, time_major=True,
                               backend=backend)
    assert_close(out, want_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", SPECS)
def test_cell_one_step(name: str, dtype) -> None:
    m = module(name)
    params, inputs, _, state = setup(name, dtype)
    hyper = HYPER.get(name, {})
    x = inputs[:, 0]
    want_out, want_state = ref.STEPS[name](params, x, state, **hyper)
    out, new = m.cell(params, x, m.State(*state), **hyper)
    assert isinstance(new, m.State)
    assert_close(out, want_out, dtype)
    assert_states_close(new, want_state, dtype)


@pytest.mark.parametrize("name", SPECS)
def test_zero_state_sizes_and_output_size(name: str) -> None:
    m = module(name)
    extra = sizes(name)
    zero = m.zero_state(3, H, dtype=np.float64, **({"input_size": IN} if name == "qrnn" else {}), **extra)
    want = ref.state_sizes(name, H, IN, num_proj(name))
    assert isinstance(zero, m.State)
    assert m.State._fields == m.STATE
    assert [z.shape for z in zero] == [(3, n) for n in want]
    assert all(z.dtype == np.float64 and not z.any() for z in zero)
    assert tuple(m.state_size(H, input_size=IN, **extra)) == want
    assert m.output_size(H, **extra) == ref.output_size(name, H, IN, num_proj(name))


def test_state_names() -> None:
    assert module("basic_rnn").STATE == ("h",)
    assert module("basic_lstm").STATE == ("c", "h")
    assert module("lstm").STATE == ("c", "h")
    assert module("gru").STATE == module("gru_cudnn").STATE == ("h",)
    assert module("qrnn").STATE == ("c", "x_prev")
    assert module("qrnn_f").STATE == ("h",)
    assert module("qrnn_ifo").STATE == ("c",)
    state = module("lstm").State(c=1, h=2)
    assert state.c == 1 and state.h == 2


#: TF's variable names and shapes (scope stripped), written out by hand for IN=5, H=4, P=3.
TF_SHAPES = {
    "basic_rnn": {"kernel": (IN + H, H), "bias": (H,)},
    "basic_lstm": {"kernel": (IN + H, 4 * H), "bias": (4 * H,)},
    "gru": {"gates/kernel": (IN + H, 2 * H), "gates/bias": (2 * H,), "candidate/kernel": (IN + H, H),
            "candidate/bias": (H,)},
    "gru_cudnn": {"input/kernel": (IN, 3 * H), "input/bias": (3 * H,), "recurrent/kernel": (H, 3 * H),
                  "recurrent/bias": (3 * H,)},
    "lstm": {"kernel": (IN + P, 4 * H), "bias": (4 * H,), "w_f_diag": (H,), "w_i_diag": (H,), "w_o_diag": (H,),
             "projection/kernel": (H, P)},
    "qrnn": {"kernel": (2 * IN, 3 * H), "bias": (3 * H,)},
    "qrnn_f": {"kernel": (IN, 2 * H), "bias": (2 * H,)},
    "qrnn_ifo": {"kernel": (IN, 4 * H), "bias": (4 * H,)},
}


@pytest.mark.parametrize("name", SPECS)
def test_param_shapes_and_init_params_use_tf_names(name: str) -> None:
    m = module(name)
    assert m.param_shapes(IN, H, **sizes(name)) == TF_SHAPES[name]
    for dtype in DTYPES:
        params = m.init_params(IN, H, dtype=dtype, seed=0, **sizes(name))
        assert {k: v.shape for k, v in params.items()} == TF_SHAPES[name]
        assert all(v.dtype == np.dtype(dtype) for v in params.values())
    again = m.init_params(IN, H, seed=0, **sizes(name))
    assert all(np.array_equal(again[k], params[k].astype(np.float32)) for k in params), "seeded: reproducible"
    for key, value in again.items():
        if key.endswith("kernel"):
            limit = np.sqrt(6.0 / sum(value.shape))  # glorot-uniform
            assert 0 < np.abs(value).max() <= limit
    # the oracle runs on them as they come
    x = np.random.default_rng(0).standard_normal((2, 3, IN)).astype(np.float32)
    out, _ = m.dynamic_rnn(again, x)
    assert_close(out, ref.dynamic_rnn(name, again, x)[0], np.float32)


def test_init_params_biases_follow_tf() -> None:
    gru = module("gru").init_params(IN, H, seed=1)
    np.testing.assert_array_equal(gru["gates/bias"], np.ones(2 * H, np.float32))  # TF GRUCell: 1.0
    np.testing.assert_array_equal(gru["candidate/bias"], np.zeros(H, np.float32))
    lstm = module("lstm").init_params(IN, H, num_proj=P, seed=1)
    np.testing.assert_array_equal(lstm["bias"], np.zeros(4 * H, np.float32))
    assert np.abs(lstm["w_f_diag"]).max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SPECS)
def test_empty_batch_and_empty_time(name: str, backend: str) -> None:
    m = module(name)
    params, inputs, lengths, state = setup(name, np.float32)
    out, final = m.dynamic_rnn(params, inputs[:0], sequence_length=lengths[:0], backend=backend)
    width = ref.output_size(name, H, IN, num_proj(name))
    assert out.shape == (0, inputs.shape[1], width)
    assert [s.shape for s in final] == [(0, n) for n in ref.state_sizes(name, H, IN, num_proj(name))]
    out, final = m.dynamic_rnn(params, inputs[:, :0], sequence_length=np.zeros(len(inputs), int),
                               initial_state=state, backend=backend)
    assert out.shape == (inputs.shape[0], 0, width)
    assert_states_close(final, state, np.float32)  # T = 0: the initial state comes back


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_clips_engage(backend: str) -> None:
    m = module("lstm")
    params, inputs, lengths, state = setup("lstm", np.float64)
    params = {k: 4 * v for k, v in params.items()}  # large pre-activations: |c| and |h| exceed the clips
    free_out, free_state = m.dynamic_rnn(params, inputs, initial_state=state, backend=backend)
    assert np.abs(free_state.c).max() > 0.4 and np.abs(free_out).max() > 0.15
    out, final = m.dynamic_rnn(params, inputs, initial_state=state, backend=backend, cell_clip=0.4, proj_clip=0.15)
    assert np.abs(final.c).max() == pytest.approx(0.4) and np.abs(out).max() == pytest.approx(0.15)
    want_out, want_state = ref.dynamic_rnn("lstm", params, inputs, None, state, cell_clip=0.4, proj_clip=0.15)
    assert_close(out, want_out, np.float64)
    assert_states_close(final, want_state, np.float64)
    # clip=None means no clipping (TF)
    out, _ = m.dynamic_rnn(params, inputs, initial_state=state, backend=backend, cell_clip=None, proj_clip=None)
    assert_close(out, free_out, np.float64)


@pytest.mark.parametrize("name", ["basic_lstm", "lstm"])
def test_forget_bias_changes_the_result(name: str) -> None:
    m = module(name)
    params, inputs, _, state = setup(name, np.float64)
    a, _ = m.dynamic_rnn(params, inputs, initial_state=state)
    b, _ = m.dynamic_rnn(params, inputs, initial_state=state, forget_bias=0.0)
    assert np.abs(a - b).max() > 1e-3
    assert_close(b, ref.dynamic_rnn(name, params, inputs, None, state, forget_bias=0.0)[0], np.float64)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["gru", "lstm", "qrnn"]),
    batch=st.integers(0, 5),
    steps=st.integers(0, 6),
    input_size=st.integers(1, 6),
    num_units=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    time_major=st.booleans(),
)
def test_property_random_shapes_and_lengths(name: str, batch: int, steps: int, input_size: int, num_units: int,
                                            seed: int, time_major: bool) -> None:
    rng = np.random.default_rng(seed)
    proj = rng.integers(1, 4) if name == "lstm" else None
    params = ref.random_params(name, input_size, num_units, rng, np.float64, num_proj=proj)
    shape = (steps, batch, input_size) if time_major else (batch, steps, input_size)
    inputs = rng.standard_normal(shape)
    lengths = rng.integers(0, steps + 1, size=batch)
    want_out, want_state = ref.dynamic_rnn(name, params, inputs, lengths, time_major=time_major)
    out, final = module(name).dynamic_rnn(params, inputs, sequence_length=lengths, time_major=time_major)
    assert_close(out, want_out, np.float64)
    assert_states_close(final, want_state, np.float64)
