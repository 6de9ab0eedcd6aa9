"""Runtime argument errors: a ValueError that names the argument and the shape it expected."""

from __future__ import annotations

import generated.gru as gru
import generated.lstm as lstm
import generated.qrnn as qrnn
import numpy as np
import pytest

import cellgen

B, T, IN, H, P = 2, 5, 3, 4, 2


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    return lstm.init_params(IN, H, num_proj=P, seed=0)


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.zeros((B, T, IN), np.float32)


def _with(params: dict, **changes) -> dict:
    out = dict(params)
    for key, value in changes.items():
        key = key.replace("__", "/")
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("bad, match", [
    (np.zeros((T, IN), np.float32),
     r"inputs must have rank 3 \[batch_size, max_time, input_size\], got shape \(5, 3\)"),
    (np.zeros((B, T, IN, 1), np.float32), r"inputs must have rank 3"),
    (np.zeros((B, T, IN), np.int64), r"inputs must be float32 or float64, got int64"),
    (np.zeros((B, T, IN), np.float16), r"inputs must be float32 or float64, got float16"),
])
def test_inputs(params, bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        lstm.dynamic_rnn(params, bad)


def test_time_major_layout_is_named(params) -> None:
    with pytest.raises(ValueError, match=r"\[max_time, batch_size, input_size\]"):
        lstm.dynamic_rnn(params, np.zeros((T, IN), np.float32), time_major=True)


def test_wrong_input_size_names_the_parameter_and_the_sizes(inputs) -> None:
    p = gru.init_params(IN + 1, H, seed=0)
    # num_units is read off the kernel's rows (input_size + num_units): the message shows what it assumed
    with pytest.raises(ValueError, match=r"parameter 'gates/kernel' has shape \(8, 8\), expected \(8, 10\) "
                                         r"for input_size=3 \(from the inputs\), num_units=5"):
        gru.dynamic_rnn(p, inputs)


@pytest.mark.parametrize("changes, match", [
    ({"w_f_diag": None}, r"missing parameter 'w_f_diag' with shape \(4,\)"),
    ({"projection__kernel": None}, r"missing parameter 'projection/kernel' with shape \(4, 2\)"),
    ({"kernel": None}, r"missing parameter 'kernel'"),
    ({"w_f_diag": np.zeros(5, np.float32)}, r"parameter 'w_f_diag' has shape \(5,\), expected \(4,\)"),
    ({"bias": np.zeros(15, np.float32)}, r"parameter 'bias' has shape \(15,\), expected \(16,\)"),
    ({"projection__kernel": np.zeros((4, 3), np.float32)},
     r"parameter 'projection/kernel' has shape \(4, 3\), expected \(4, 2\)"),
    ({"kernel": np.zeros(5, np.float32)}, r"parameter 'kernel' has shape \(5,\), expected rank 2"),
    ({"w_i_diag": [0.0] * 4}, r"parameter 'w_i_diag' is a list, expected an array of shape \(4,\)"),
    ({"extra": np.zeros(4, np.float32)}, r"unknown parameter\(s\) 'extra'; expected 'kernel', 'bias'"),
    ({"w_o_diag": np.zeros(4, np.float64)},
     r"parameter 'w_o_diag' has dtype float64, expected float32 \(the inputs' dtype\)"),
])
def test_params(params, inputs, changes, match) -> None:
    with pytest.raises(ValueError, match=match):
        lstm.dynamic_rnn(_with(params, **changes), inputs)


def test_params_dtype_must_match_inputs(params, inputs) -> None:
    with pytest.raises(ValueError, match=r"parameter 'kernel' has dtype float32, expected float64"):
        lstm.dynamic_rnn(params, inputs.astype(np.float64))


def test_params_must_be_a_dict(inputs) -> None:
    with pytest.raises(ValueError, match=r"params must be a dict of parameter arrays, got list"):
        lstm.dynamic_rnn([np.zeros(3)], inputs)


@pytest.mark.parametrize("lengths, match", [
    ([-1, 2], r"sequence_length values must lie in \[0, max_time=5\], got min -1"),
    ([6, 2], r"sequence_length values must lie in \[0, max_time=5\], got min 2, max 6"),
    ([1, 2, 3], r"sequence_length must have shape \[batch_size\] = \(2,\), got \(3,\)"),
    ([[1, 2]], r"sequence_length must have shape \[batch_size\] = \(2,\), got \(1, 2\)"),
    (3, r"sequence_length must have shape \[batch_size\] = \(2,\), got \(\)"),
    ([1.5, 2], r"sequence_length must hold integers, got dtype float64"),
])
def test_sequence_length(params, inputs, lengths, match) -> None:
    with pytest.raises(ValueError, match=match):
        lstm.dynamic_rnn(params, inputs, sequence_length=lengths)


def test_integral_float_lengths_are_accepted(params, inputs) -> None:
    out, _ = lstm.dynamic_rnn(params, inputs + 1, sequence_length=np.array([2.0, 5.0]))
    assert not out[0, 2:].any() and out[1, 4].any()


@pytest.mark.parametrize("state, match", [
    ((np.zeros((B, H), np.float32),), r"initial_state must have 2 states \(c, h\), got 1"),
    ((np.zeros((B, H), np.float32), np.zeros((B, H), np.float32)),
     r"initial_state.h must have shape \[batch_size, h_size\] = \(2, 2\), got \(2, 4\)"),
    ((np.zeros((B + 1, H), np.float32), np.zeros((B, P), np.float32)),
     r"initial_state.c must have shape \[batch_size, c_size\] = \(2, 4\), got \(3, 4\)"),
    (np.zeros((B, H), np.float32), r"initial_state must be a tuple of 2 arrays \(c, h\)"),
    ((np.zeros((B, H), np.int64), np.zeros((B, P), np.float32)), r"initial_state.c must be float32 or float64"),
])
def test_initial_state(params, inputs, state, match) -> None:
    with pytest.raises(ValueError, match=match):
        lstm.dynamic_rnn(params, inputs, initial_state=state)


def test_initial_state_of_a_delay_state(inputs) -> None:
    p = qrnn.init_params(IN, H, seed=0)
    bad = (np.zeros((B, H), np.float32), np.zeros((B, H), np.float32))
    with pytest.raises(ValueError, match=r"initial_state.x_prev must have shape \[batch_size, x_prev_size\] = "
                                         r"\(2, 3\), got \(2, 4\)"):
        qrnn.dynamic_rnn(p, inputs, initial_state=bad)


def test_bidirectional_names_the_direction(params, inputs) -> None:
    with pytest.raises(ValueError, match=r"initial_state_bw must have 2 states"):
        lstm.bidirectional_dynamic_rnn(params, params, inputs, initial_state_bw=(np.zeros((B, H), np.float32),))
    with pytest.raises(ValueError, match=r"initial_state_fw.h must have shape"):
        lstm.bidirectional_dynamic_rnn(params, params, inputs,
                                       initial_state_fw=(np.zeros((B, H), np.float32),) * 2)


@pytest.mark.parametrize("hyper, match", [
    ({"forget_bais": 1.0}, r"unknown keyword argument\(s\) forget_bais; hyperparameters of this cell: "
                           r"forget_bias, cell_clip, proj_clip"),
    ({"forget_bias": "a"}, r"hyperparameter forget_bias must be a number, got 'a'"),
])
def test_hyper(params, inputs, hyper, match) -> None:
    with pytest.raises(ValueError, match=match):
        lstm.dynamic_rnn(params, inputs, **hyper)


def test_hyper_of_a_cell_without_hypers(inputs) -> None:
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) forget_bias; hyperparameters of this "
                                         r"cell: none"):
        gru.dynamic_rnn(gru.init_params(IN, H), inputs, forget_bias=1.0)


def test_unknown_backend(params, inputs) -> None:
    with pytest.raises(ValueError, match=r"backend must be one of cpu, cuda, reference, got 'tpu'"):
        lstm.dynamic_rnn(params, inputs, backend="tpu")


def test_cell_step(params, inputs) -> None:
    with pytest.raises(ValueError, match=r"state must be a tuple of 2 arrays \(c, h\)"):
        lstm.cell(params, inputs[:, 0], None)
    with pytest.raises(ValueError, match=r"inputs must have rank 2 \[batch_size, input_size\], got shape"):
        lstm.cell(params, inputs, lstm.zero_state(B, H, num_proj=P))


def test_sizes() -> None:
    with pytest.raises(ValueError, match=r"size 'num_proj' is required \(pass num_proj=<int>\)"):
        lstm.init_params(IN, H)
    with pytest.raises(ValueError, match=r"unknown size argument\(s\) num_proj; this cell takes no extra sizes"):
        gru.init_params(IN, H, num_proj=2)
    with pytest.raises(ValueError, match=r"size 'num_proj' must be a non-negative int, got 2.5"):
        lstm.param_shapes(IN, H, num_proj=2.5)


def test_multi_rnn(params, inputs) -> None:
    with pytest.raises(ValueError, match=r"layers must be a non-empty list"):
        cellgen.multi_rnn([], inputs)
    with pytest.raises(ValueError, match=r"layers\[1\] must be \(module, params\) or \(module, params, hyper\)"):
        cellgen.multi_rnn([(lstm, params), gru], inputs)
    with pytest.raises(ValueError, match=r"layers\[0\]\[0\] must be a generated cell module"):
        cellgen.multi_rnn([("lstm", params)], inputs)
    with pytest.raises(ValueError, match=r"initial_states must have one entry per layer \(1\), got 2"):
        cellgen.multi_rnn([(lstm, params)], inputs, initial_states=[None, None])
    # layer 2 gets lstm's outputs (num_proj = 2 wide), its params were made for input_size 3
    with pytest.raises(ValueError, match=r"parameter 'gates/kernel' has shape \(7, 8\).*input_size=2"):
        cellgen.multi_rnn([(lstm, params), (gru, gru.init_params(IN, H))], inputs)
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) cell_clip"):
        cellgen.multi_rnn([(gru, gru.init_params(IN, H), {"cell_clip": 1.0})], inputs)
