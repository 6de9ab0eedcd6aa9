"""Sanity checks of the NumPy oracle in ``references.py`` against hand-derived identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from references import (
    STEPS,
    bidirectional_dynamic_rnn,
    dynamic_rnn,
    multi_rnn,
    output_size,
    random_params,
    sigmoid,
    state_sizes,
)

ALL_CELLS = sorted(STEPS)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _setup(name: str, dtype: type = np.float64, batch: int = 3, steps: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    i, h = 4, 3
    num_proj = 2 if name == "lstm" else None
    params = random_params(name, i, h, rng, dtype, num_proj=num_proj)
    inputs = rng.standard_normal((batch, steps, i)).astype(dtype)
    sizes = state_sizes(name, h, i, num_proj)
    state = tuple(rng.standard_normal((batch, s)).astype(dtype) for s in sizes)
    return params, inputs, state, output_size(name, h, i, num_proj)


def test_sigmoid_is_stable_and_keeps_dtype() -> None:
    x = np.array([-1e4, -30.0, 0.0, 30.0, 1e4], dtype=np.float32)
    with np.errstate(all="raise"):
        y = sigmoid(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [0.0, _sig(-30.0), 0.5, 1.0, 1.0], atol=1e-7)


def test_basic_lstm_hand_computed() -> None:
    # I = 1, H = 1: rows [x, h], columns i, j, f, o.
    kernel = np.array([[0.5, -1.0, 2.0, 0.25], [1.5, 0.5, -0.5, 1.0]])
    bias = np.array([0.1, 0.2, 0.3, 0.4])
    x, c, h = 0.7, -0.3, 0.6
    out, (c_new, h_new) = STEPS["basic_lstm"](
        {"kernel": kernel, "bias": bias}, np.array([[x]]), (np.array([[c]]), np.array([[h]])), forget_bias=0.0
    )
    i = 0.5 * x + 1.5 * h + 0.1
    j = -1.0 * x + 0.5 * h + 0.2
    f = 2.0 * x - 0.5 * h + 0.3
    o = 0.25 * x + 1.0 * h + 0.4
    c_exp = c * _sig(f) + _sig(i) * math.tanh(j)
    h_exp = math.tanh(c_exp) * _sig(o)
    assert c_new[0, 0] == pytest.approx(c_exp, rel=1e-12)
    assert h_new[0, 0] == pytest.approx(h_exp, rel=1e-12)
    assert out[0, 0] == pytest.approx(h_exp, rel=1e-12)


def test_basic_lstm_forget_bias_shifts_f() -> None:
    params, inputs, state, _ = _setup("basic_lstm")
    h = state[0].shape[1]
    shifted = dict(params)
    shifted["bias"] = params["bias"].copy()
    shifted["bias"][2 * h : 3 * h] += 1.0
    a = STEPS["basic_lstm"](params, inputs[:, 0], state, forget_bias=1.0)
    b = STEPS["basic_lstm"](shifted, inputs[:, 0], state, forget_bias=0.0)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(a[0], STEPS["basic_lstm"](params, inputs[:, 0], state, forget_bias=0.0)[0])


@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_lstm_without_extras_equals_basic_lstm(forget_bias: float) -> None:
    rng = np.random.default_rng(1)
    i, h = 4, 3
    basic = random_params("basic_lstm", i, h, rng, np.float64)
    full = {
        "kernel": basic["kernel"],
        "bias": basic["bias"],
        "w_f_diag": np.zeros(h),
        "w_i_diag": np.zeros(h),
        "w_o_diag": np.zeros(h),
        "projection/kernel": np.eye(h),
    }
    x = rng.standard_normal((5, i))
    state = (rng.standard_normal((5, h)), rng.standard_normal((5, h)))
    ob, sb = STEPS["basic_lstm"](basic, x, state, forget_bias=forget_bias)
    ol, sl = STEPS["lstm"](full, x, state, forget_bias=forget_bias)
    np.testing.assert_allclose(ol, ob, rtol=1e-12)
    for a, b in zip(sl, sb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_lstm_clips() -> None:
    params, inputs, state, _ = _setup("lstm")
    state = (state[0] * 10.0, state[1])
    out, (c, _) = STEPS["lstm"](params, inputs[:, 0], state, cell_clip=0.5, proj_clip=0.05)
    assert np.max(np.abs(c)) <= 0.5
    assert np.max(np.abs(out)) <= 0.05
    assert np.any(np.abs(c) == 0.5)
    unclipped, _ = STEPS["lstm"](params, inputs[:, 0], state)
    assert np.max(np.abs(unclipped)) > 0.05


def test_gru_cudnn_matches_elementwise_loop() -> None:
    params, inputs, state, _ = _setup("gru_cudnn")
    x, (h,) = inputs[:, 0], state
    wi, bi = params["input/kernel"], params["input/bias"]
    wh, bh = params["recurrent/kernel"], params["recurrent/bias"]
    batch, hidden = h.shape
    expected = np.zeros_like(h)
    for b in range(batch):
        for k in range(hidden):

            def gx(g: int, b: int = b, k: int = k) -> float:
                col = g * hidden + k
                return sum(x[b, m] * wi[m, col] for m in range(x.shape[1])) + bi[col]

            def gh(g: int, b: int = b, k: int = k) -> float:
                col = g * hidden + k
                return sum(h[b, m] * wh[m, col] for m in range(hidden)) + bh[col]

            r = _sig(gx(0) + gh(0))
            z = _sig(gx(1) + gh(1))
            n = math.tanh(gx(2) + r * gh(2))
            expected[b, k] = (1.0 - z) * n + z * h[b, k]
    out, (h_new,) = STEPS["gru_cudnn"](params, x, state)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_array_equal(out, h_new)


def test_gru_matches_tf_equations() -> None:
    # TF GRUCell: reset gate multiplies h before the candidate matmul (unlike cuDNN).
    rng = np.random.default_rng(3)
    i, h = 2, 3
    p = random_params("gru", i, h, rng, np.float64)
    x = rng.standard_normal((2, i))
    s = (rng.standard_normal((2, h)),)
    out, _ = STEPS["gru"](p, x, s)
    value = sigmoid(np.concatenate([x, s[0]], 1) @ p["gates/kernel"] + p["gates/bias"])
    r, u = value[:, :h], value[:, h:]
    cand = np.tanh(np.concatenate([x, r * s[0]], 1) @ p["candidate/kernel"] + p["candidate/bias"])
    np.testing.assert_allclose(out, u * s[0] + (1 - u) * cand, rtol=1e-12)


def test_qrnn_window_uses_previous_input() -> None:
    params, inputs, state, _ = _setup("qrnn")
    outputs, (c, x_prev) = dynamic_rnn("qrnn", params, inputs, initial_state=state)
    np.testing.assert_array_equal(x_prev, inputs[:, -1])
    # second step by hand: window [x_1, x_0]
    _, s1 = STEPS["qrnn"](params, inputs[:, 0], state)
    pre = np.concatenate([inputs[:, 1], inputs[:, 0]], 1) @ params["kernel"] + params["bias"]
    hdim = c.shape[1]
    z, f, o = np.tanh(pre[:, :hdim]), sigmoid(pre[:, hdim : 2 * hdim]), sigmoid(pre[:, 2 * hdim :])
    np.testing.assert_allclose(outputs[:, 1], o * (f * s1[0] + (1 - f) * z), rtol=1e-12)


@pytest.mark.parametrize("name", ALL_CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(name: str, dtype: type) -> None:
    params, inputs, state, width = _setup(name, dtype)
    outputs, final = dynamic_rnn(name, params, inputs, [5, 2, 0], initial_state=state)
    assert outputs.dtype == dtype
    assert outputs.shape == (3, 5, width)
    assert all(s.dtype == dtype for s in final)


@pytest.mark.parametrize("name", ALL_CELLS)
def test_dynamic_rnn_masking(name: str) -> None:
    params, inputs, state, _ = _setup(name)
    lengths = np.array([5, 2, 0])
    outputs, final = dynamic_rnn(name, params, inputs, lengths, initial_state=state)
    for b, length in enumerate(lengths):
        s = tuple(c[b : b + 1] for c in state)
        for t in range(length):
            out, s = STEPS[name](params, inputs[b : b + 1, t], s)
            np.testing.assert_allclose(outputs[b, t], out[0], rtol=1e-12)
        assert np.all(outputs[b, length:] == 0.0)
        for got, want in zip(final, s, strict=True):
            np.testing.assert_allclose(got[b], want[0], rtol=1e-12)


def test_dynamic_rnn_time_major_and_empty() -> None:
    params, inputs, state, width = _setup("gru")
    bm, fb = dynamic_rnn("gru", params, inputs, [4, 5, 1], initial_state=state)
    tm, ft = dynamic_rnn("gru", params, inputs.transpose(1, 0, 2), [4, 5, 1], state, time_major=True)
    np.testing.assert_array_equal(tm.transpose(1, 0, 2), bm)
    np.testing.assert_array_equal(ft[0], fb[0])
    out, final = dynamic_rnn("gru", params, inputs[:, :0], initial_state=state)
    assert out.shape == (3, 0, width)
    np.testing.assert_array_equal(final[0], state[0])
    out, final = dynamic_rnn("gru", params, inputs[:0])
    assert out.shape == (0, 5, width) and final[0].shape == (0, 3)


@pytest.mark.parametrize("name", ["basic_lstm", "lstm", "qrnn"])
def test_bidirectional_full_length_backward_is_flip(name: str) -> None:
    params, inputs, state, _ = _setup(name)
    params_bw = random_params(name, 4, 3, np.random.default_rng(9), np.float64, 2 if name == "lstm" else None)
    (fw, bw), (sf, sb) = bidirectional_dynamic_rnn(name, params, params_bw, inputs, initial_state_bw=state)
    ref_fw, ref_sf = dynamic_rnn(name, params, inputs)
    ref_bw, ref_sb = dynamic_rnn(name, params_bw, inputs[:, ::-1], initial_state=state)
    np.testing.assert_allclose(fw, ref_fw, rtol=1e-12)
    np.testing.assert_allclose(bw, ref_bw[:, ::-1], rtol=1e-12)
    for a, b in zip(sb + sf, ref_sb + ref_sf, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_bidirectional_ragged_backward() -> None:
    params, inputs, _, _ = _setup("basic_rnn")
    lengths = [3, 5, 0]
    (_, bw), (_, sb) = bidirectional_dynamic_rnn("basic_rnn", params, params, inputs, lengths)
    for b, length in enumerate(lengths):
        ref, s = dynamic_rnn("basic_rnn", params, inputs[b : b + 1, :length][:, ::-1])
        np.testing.assert_allclose(bw[b, :length], ref[0, ::-1], rtol=1e-12)
        assert np.all(bw[b, length:] == 0.0)
        np.testing.assert_allclose(sb[0][b], s[0][0], rtol=1e-12)


def test_multi_rnn_one_layer_equals_dynamic_rnn() -> None:
    params, inputs, state, _ = _setup("basic_lstm")
    lengths = [5, 3, 1]
    ref, ref_state = dynamic_rnn("basic_lstm", params, inputs, lengths, state, forget_bias=0.5)
    out, states = multi_rnn([("basic_lstm", params, {"forget_bias": 0.5})], inputs, lengths, [state])
    np.testing.assert_array_equal(out, ref)
    assert len(states) == 1
    for a, b in zip(states[0], ref_state, strict=True):
        np.testing.assert_array_equal(a, b)


def test_multi_rnn_two_layers_full_length_equals_chained() -> None:
    rng = np.random.default_rng(5)
    p1 = random_params("gru", 4, 3, rng, np.float64)
    p2 = random_params("lstm", 3, 6, rng, np.float64, num_proj=2)
    inputs = rng.standard_normal((2, 4, 4))
    out, (s1, s2) = multi_rnn([("gru", p1, {}), ("lstm", p2, {"cell_clip": 1.0})], inputs)
    mid, r1 = dynamic_rnn("gru", p1, inputs)
    ref, r2 = dynamic_rnn("lstm", p2, mid, cell_clip=1.0)
    assert out.shape == (2, 4, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    for a, b in zip(s1 + s2, r1 + r2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("name", ALL_CELLS)
def test_random_params_shapes_are_consumed(name: str) -> None:
    rng = np.random.default_rng(2)
    params = random_params(name, 4, 3, rng, np.float32, num_proj=2 if name == "lstm" else None)
    assert all(v.dtype == np.float32 and np.all(np.abs(v) <= 0.5) for v in params.values())
    sizes = state_sizes(name, 3, 4, 2 if name == "lstm" else None)
    state = tuple(np.zeros((2, s), np.float32) for s in sizes)
    out, new = STEPS[name](params, np.ones((2, 4), np.float32), state)
    assert out.shape == (2, output_size(name, 3, 4, 2 if name == "lstm" else None))
    assert tuple(s.shape[1] for s in new) == sizes
