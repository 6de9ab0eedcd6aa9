"""Training: ``dynamic_rnn_vjp`` gradients against torch autograd of independent references.

The references (``tests/torch_cells.py``) are written from the published equations: ``torch.nn.LSTM``
and ``torch.nn.GRU`` themselves for ``basic_lstm`` and ``gru_cudnn``, eager TF 1.x ``LSTMCell``
(peepholes, clips, projection), ``GRUCell`` and QRNN fo-pooling for ``lstm``, ``gru`` and ``qrnn``.
Their forward passes are checked here against every generated module's ``dynamic_rnn`` (the
``test_reference_*`` tests); the ``test_vjp_*`` tests then compare the module's
``dynamic_rnn_vjp`` + ``backward`` with torch autograd for the loss

    sum(outputs * d_outputs) + sum over states s of sum(final_s * d_state_s)

with random ``d_outputs`` (also past each row's length, where the outputs are constant zeros) and
random ``d_state``, ragged lengths with a 0 and a full row, random initial states, batch- and
time-major inputs, backends cpu and reference, float64 (1e-10) and float32 (1e-4), each relative
to the largest magnitude of the reference's array.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch_cells as tc

CELLS = ("basic_lstm", "gru_cudnn", "lstm", "gru", "qrnn")
BACKENDS = ("cpu", "reference")
DTYPES = (np.float64, np.float32)
IN, H, P = 5, 4, 3  # input_size, num_units, num_proj: all different, so a mixed-up size shows
BATCH, STEPS = 6, 7
#: Hyperparameters away from their defaults; lstm's clips engage on part of the values (checked below).
HYPER: dict[str, dict[str, float]] = {
    "basic_lstm": {"forget_bias": 0.3},
    "lstm": {"forget_bias": 0.7, "cell_clip": 0.5, "proj_clip": 0.15},
}
#: Tolerances relative to the reference's largest magnitude (per array).
GRAD_TOL = {np.float64: 1e-10, np.float32: 1e-4}
FORWARD_TOL = {np.float64: 1e-10, np.float32: 1e-5}
#: The references for torch.nn.LSTM / torch.nn.GRU run packed (pack_padded_sequence) or step by step.
NN_CELLS = ("basic_lstm", "gru_cudnn")
VARIANTS = [(name, mode) for name in CELLS for mode in (("packed", "steps") if name in NN_CELLS else (None,))]


def _dtype_id(d: Any) -> str:
    return np.dtype(d).name


def module(name: str) -> ModuleType:
    return importlib.import_module(f"generated.{name}")


def sizes(name: str) -> dict[str, int]:
    """The extra size keywords a generated module takes."""
    return {"num_proj": P} if name == "lstm" else {}


@dataclass
class Case:
    """One call: what the module gets, and the cotangents of its results."""

    name: str
    mod: ModuleType
    params: dict[str, np.ndarray]
    inputs: np.ndarray  # in the call's layout (time-major when time_major)
    lengths: np.ndarray | None
    state: tuple[np.ndarray, ...]  # the initial state's values (zeros when initial_state is None)
    initial_state: tuple[np.ndarray, ...] | None  # what the module gets
    time_major: bool
    hyper: dict[str, float]
    d_outputs: np.ndarray
    d_state: tuple[np.ndarray, ...] | None


def random_params(mod: ModuleType, name: str, dtype: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``init_params`` (names, shapes, layout) moved off its constant biases, so every entry is generic."""
    base = mod.init_params(IN, H, dtype=np.float64, seed=int(rng.integers(1 << 31)), **sizes(name))
    return {k: (v + rng.uniform(-0.3, 0.3, size=v.shape)).astype(dtype) for k, v in base.items()}


def make_case(name: str, dtype: Any, *, time_major: bool = False, seed: int = 0, ragged: bool = True,
              initial: bool = True, d_state: bool = True) -> Case:
    mod = module(name)
    rng = np.random.default_rng(seed)
    params = random_params(mod, name, dtype, rng)
    inputs = rng.standard_normal((BATCH, STEPS, IN)).astype(dtype)
    lengths = None
    if ragged:
        lengths = rng.integers(0, STEPS + 1, size=BATCH)
        lengths[0], lengths[-1] = STEPS, 0
    widths = mod.state_size(H, input_size=IN, **sizes(name))
    if initial:
        state = tuple(rng.standard_normal((BATCH, n)).astype(dtype) for n in widths)
    else:
        state = tuple(np.zeros((BATCH, n), dtype=dtype) for n in widths)
    out_width = mod.output_size(H, **sizes(name))
    d_outputs = rng.standard_normal((BATCH, STEPS, out_width)).astype(dtype)
    d_st = tuple(rng.standard_normal((BATCH, n)).astype(dtype) for n in widths) if d_state else None
    if time_major:
        inputs = np.ascontiguousarray(inputs.transpose(1, 0, 2))
        d_outputs = np.ascontiguousarray(d_outputs.transpose(1, 0, 2))
    return Case(name, mod, params, inputs, lengths, state, state if initial else None, time_major,
                dict(HYPER.get(name, {})), d_outputs, d_st)


@dataclass
class TorchResult:
    outputs: np.ndarray
    state: tuple[np.ndarray, ...]
    d_params: dict[str, np.ndarray]
    d_inputs: np.ndarray
    d_initial_state: tuple[np.ndarray, ...]


def _leaf(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, requires_grad=True)


def torch_reference(case: Case, mode: str | None = None) -> TorchResult:
    """The reference's forward and the gradients of the case's loss, by torch autograd (in the case's dtype)."""
    params = {k: _leaf(v) for k, v in case.params.items()}
    inputs = _leaf(case.inputs)
    state = tuple(_leaf(s) for s in case.state)
    kw = {} if mode is None else {"mode": mode}
    out, final = tc.REFERENCES[case.name](params, inputs, case.lengths, state, time_major=case.time_major,
                                          **case.hyper, **kw)
    loss = (out * torch.from_numpy(case.d_outputs)).sum()
    if case.d_state is not None:
        for s, d in zip(final, case.d_state, strict=True):
            loss = loss + (s * torch.from_numpy(d)).sum()
    loss.backward()

    def grad(t: torch.Tensor) -> np.ndarray:
        return np.zeros(tuple(t.shape), dtype=case.inputs.dtype) if t.grad is None else t.grad.numpy()

    return TorchResult(out.detach().numpy(), tuple(s.detach().numpy() for s in final),
                       {k: grad(v) for k, v in params.items()}, grad(inputs), tuple(grad(s) for s in state))


def assert_close(actual: Any, expected: np.ndarray, tol: float, what: str) -> None:
    """Same shape and dtype, and max |actual - expected| <= tol * max |expected|."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    if expected.size == 0:
        return
    assert np.all(np.isfinite(actual)), f"{what}: not finite"
    scale = float(np.max(np.abs(expected))) or 1.0
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    assert err <= tol * scale, f"{what}: max |diff| = {err:.3g} > {tol:g} * max |reference| = {tol * scale:.3g}"


def padded(case: Case) -> np.ndarray:
    """[B, T] True where t >= the row's length (all False for full lengths)."""
    lengths = np.full(BATCH, STEPS) if case.lengths is None else case.lengths
    return np.arange(STEPS)[None, :] >= lengths[:, None]


def batch_major(a: np.ndarray, time_major: bool) -> np.ndarray:
    return a.transpose(1, 0, 2) if time_major else a


# --------------------------------------------------------------------------------------------
# the references' forward passes against the generated modules (these pass without the vjp)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "mode"), VARIANTS)
def test_reference_forward_matches_dynamic_rnn(name: str, mode: str | None, backend: str, time_major: bool,
                                               dtype: Any) -> None:
    kw = {} if mode is None else {"mode": mode}
    tol = FORWARD_TOL[dtype]
    for case in (make_case(name, dtype, time_major=time_major, seed=1),
                 make_case(name, dtype, time_major=time_major, seed=2, ragged=False, initial=False)):
        out, state = case.mod.dynamic_rnn(case.params, case.inputs, sequence_length=case.lengths,
                                          initial_state=case.initial_state, time_major=case.time_major,
                                          backend=backend, **case.hyper)
        with torch.no_grad():
            ref_out, ref_state = tc.REFERENCES[name](case.params, torch.from_numpy(case.inputs), case.lengths,
                                                     case.initial_state, time_major=time_major, **case.hyper, **kw)
        assert_close(out, ref_out.numpy(), tol, "outputs")
        assert len(state) == len(ref_state)
        for k, (s, r) in enumerate(zip(state, ref_state, strict=True)):
            assert_close(s, r.numpy(), tol, f"state.{case.mod.STATE[k]}")
        assert not np.any(batch_major(ref_out.numpy(), time_major)[padded(case)]), "zero outputs past the lengths"


def test_reference_lstm_clips_are_active() -> None:
    """The lstm cases clip part of the cell values and part of the projected outputs, not all of them."""
    case = make_case("lstm", np.float64, seed=1)
    with torch.no_grad():
        out, (c, _) = tc.lstm(case.params, torch.from_numpy(case.inputs), case.lengths, case.initial_state,
                              **case.hyper)
    c, out = np.abs(c.numpy()), np.abs(batch_major(out.numpy(), False)[~padded(case)])
    cell_clip, proj_clip = case.hyper["cell_clip"], case.hyper["proj_clip"]
    assert np.any(c == cell_clip) and np.any(c < cell_clip)
    assert np.any(out == proj_clip) and np.any(out < proj_clip)
    with torch.no_grad():
        free, _ = tc.lstm(case.params, torch.from_numpy(case.inputs), case.lengths, case.initial_state,
                          forget_bias=case.hyper["forget_bias"])
    assert np.max(np.abs(free.numpy())) > proj_clip


@pytest.mark.parametrize("forget_bias", [1.0, 0.3])
def test_lstm_conversion_gate_order_and_forget_bias(forget_bias: float) -> None:
    """TF (i, j, f, o) columns become PyTorch (i, f, g, o) rows; forget_bias lives in bias_hh's f block."""
    mod = module("basic_lstm")
    i, h = 2, 3
    params = mod.init_params(i, h, dtype=np.float64, seed=0)
    params["kernel"] = np.repeat(np.arange(4.0), h)[None, :] + np.arange(i + h)[:, None] / 10  # block k = k + row/10
    params["bias"] = np.repeat(np.arange(4.0), h) + 0.5
    w = tc.lstm_weights_from_tf(params, forget_bias)
    assert w["weight_ih_l0"].shape == (4 * h, i) and w["weight_hh_l0"].shape == (4 * h, h)
    for block, tf_gate in enumerate((0, 2, 1, 3)):  # torch i, f, g, o = TF i, f, j, o
        rows = slice(block * h, (block + 1) * h)
        np.testing.assert_array_equal(w["weight_ih_l0"][rows].numpy(), params["kernel"][:i, tf_gate * h:][:, :h].T)
        np.testing.assert_array_equal(w["weight_hh_l0"][rows].numpy(), params["kernel"][i:, tf_gate * h:][:, :h].T)
        np.testing.assert_array_equal(w["bias_ih_l0"][rows].numpy(), np.full(h, tf_gate + 0.5))
        np.testing.assert_array_equal(w["bias_hh_l0"][rows].numpy(), np.full(h, forget_bias if block == 1 else 0.0))
    back = tc.lstm_weights_to_tf(w, forget_bias)
    np.testing.assert_array_equal(back["kernel"], params["kernel"])
    np.testing.assert_allclose(back["bias"], params["bias"], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", NN_CELLS)
def test_weights_loaded_into_a_plain_torch_module(name: str) -> None:
    """The converted weights in an nn.LSTM / nn.GRU used the ordinary way (load_state_dict, module(x))
    give the generated module's numbers: the conversion is exact, not only inside the references."""
    case = make_case(name, np.float64, seed=3, ragged=False)
    out, state = case.mod.dynamic_rnn(case.params, case.inputs, initial_state=case.initial_state, **case.hyper)
    if name == "basic_lstm":
        weights = tc.lstm_weights_from_tf(case.params, case.hyper["forget_bias"])
        c0, h0 = (torch.from_numpy(s)[None] for s in case.initial_state)
        hx: Any = (h0, c0)
    else:
        weights = tc.gru_weights_from_tf(case.params)
        hx = torch.from_numpy(case.initial_state[0])[None]
    net = tc.make_module("lstm" if name == "basic_lstm" else "gru", IN, H, torch.float64)
    net.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
    with torch.no_grad():
        y, h_n = net(torch.from_numpy(case.inputs), hx)
    np.testing.assert_allclose(y.numpy(), out, rtol=1e-12, atol=1e-12)
    finals = (h_n[1], h_n[0]) if name == "basic_lstm" else (h_n,)  # TF order (c, h)
    for s, r in zip(state, finals, strict=True):
        np.testing.assert_allclose(s, r[0].numpy(), rtol=1e-12, atol=1e-12)
    if name == "gru_cudnn":
        back = tc.gru_weights_to_tf(net.state_dict())
        for k, v in case.params.items():
            np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("name", NN_CELLS)
def test_nn_reference_modes_agree_on_gradients(name: str) -> None:
    """pack_padded_sequence and the step-by-step module calls give the same autograd gradients."""
    case = make_case(name, np.float64, seed=4)
    packed, steps = torch_reference(case, "packed"), torch_reference(case, "steps")
    for k in case.params:
        assert_close(packed.d_params[k], steps.d_params[k], 1e-13, k)
    assert_close(packed.d_inputs, steps.d_inputs, 1e-13, "inputs")
    for a, b in zip(packed.d_initial_state, steps.d_initial_state, strict=True):
        assert_close(a, b, 1e-13, "initial_state")


def test_reference_bidirectional_matches_module() -> None:
    """torch_cells.bidirectional_dynamic_rnn (reverse_sequence by gather) against the module's."""
    for name in CELLS:
        case = make_case(name, np.float64, seed=5)
        params_bw = random_params(case.mod, name, np.float64, np.random.default_rng(6))
        state_bw = tuple(s[::-1].copy() for s in case.state)
        (fw, bw), (sf, sb) = case.mod.bidirectional_dynamic_rnn(
            case.params, params_bw, case.inputs, sequence_length=case.lengths, initial_state_fw=case.state,
            initial_state_bw=state_bw, **case.hyper)
        with torch.no_grad():
            (rfw, rbw), (rsf, rsb) = tc.bidirectional_dynamic_rnn(
                name, case.params, params_bw, torch.from_numpy(case.inputs), case.lengths, case.state, state_bw,
                **case.hyper)
        assert_close(fw, rfw.numpy(), 1e-10, f"{name} out_fw")
        assert_close(bw, rbw.numpy(), 1e-10, f"{name} out_bw")
        for a, r in zip(tuple(sf) + tuple(sb), rsf + rsb, strict=True):
            assert_close(a, r.numpy(), 1e-10, f"{name} states")


# --------------------------------------------------------------------------------------------
# dynamic_rnn_vjp against torch autograd
# --------------------------------------------------------------------------------------------


def run_vjp(case: Case, backend: str, **kw: Any) -> tuple[np.ndarray, Any, Any]:
    """The module's vjp on the case: (outputs, state, grads), checking the forward equals dynamic_rnn's."""
    mod = case.mod
    (out, state), backward = mod.dynamic_rnn_vjp(case.params, case.inputs, sequence_length=case.lengths,
                                                 initial_state=case.initial_state, time_major=case.time_major,
                                                 backend=backend, **kw, **case.hyper)
    assert isinstance(state, mod.State)
    plain_out, plain_state = mod.dynamic_rnn(case.params, case.inputs, sequence_length=case.lengths,
                                             initial_state=case.initial_state, time_major=case.time_major,
                                             backend=backend, **case.hyper)
    np.testing.assert_array_equal(out, plain_out)
    for a, b in zip(state, plain_state, strict=True):
        np.testing.assert_array_equal(a, b)
    d_state = None if case.d_state is None else mod.State(*case.d_state)
    grads = backward(case.d_outputs, d_state)
    return out, state, grads


def check_against_torch(case: Case, out: np.ndarray, state: Any, grads: Any, tol: float) -> None:
    ref = torch_reference(case)
    mod = case.mod
    assert_close(out, ref.outputs, tol, "outputs")
    for k, (s, r) in enumerate(zip(state, ref.state, strict=True)):
        assert_close(s, r, tol, f"state.{mod.STATE[k]}")

    assert set(grads.params) == set(case.params), f"grads.params names {sorted(grads.params)}"
    for k in case.params:
        assert_close(grads.params[k], ref.d_params[k], tol, f"grads.params[{k!r}]")
    assert_close(grads.inputs, ref.d_inputs, tol, "grads.inputs")
    assert not np.any(batch_major(np.asarray(grads.inputs), case.time_major)[padded(case)]), (
        "inputs past a row's length get no gradient")
    assert isinstance(grads.initial_state, mod.State)
    for k, (g, r) in enumerate(zip(grads.initial_state, ref.d_initial_state, strict=True)):
        assert_close(g, r, tol, f"grads.initial_state.{mod.STATE[k]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELLS)
def test_vjp_matches_torch_autograd(name: str, backend: str, time_major: bool, dtype: Any) -> None:
    """Ragged lengths (a 0 and a full row), random initial state, d_outputs and d_state both nonzero."""
    case = make_case(name, dtype, time_major=time_major, seed=10)
    out, state, grads = run_vjp(case, backend)
    check_against_torch(case, out, state, grads, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELLS)
def test_vjp_recompute_matches_torch_autograd(name: str, backend: str) -> None:
    """recompute=True (the backward recomputes the gates from the states) gives the same gradients."""
    case = make_case(name, np.float64, seed=11)
    out, state, grads = run_vjp(case, backend, recompute=True)
    check_against_torch(case, out, state, grads, GRAD_TOL[np.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELLS)
def test_vjp_defaults_match_torch_autograd(name: str, backend: str) -> None:
    """No sequence_length, no initial_state (zeros; its gradient is still returned), d_state=None;
    cpu by default."""
    case = make_case(name, np.float64, seed=12, ragged=False, initial=False, d_state=False)
    mod = case.mod
    kw = {} if backend == "cpu" else {"backend": backend}
    (out, state), backward = mod.dynamic_rnn_vjp(case.params, case.inputs, **kw, **case.hyper)
    grads = backward(case.d_outputs)
    check_against_torch(case, out, state, grads, GRAD_TOL[np.float64])


@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELLS)
def test_bidirectional_vjp_matches_torch_autograd(name: str, backend: str, time_major: bool) -> None:
    """bidirectional_dynamic_rnn_vjp against autograd through torch_cells.bidirectional_dynamic_rnn.

    The API (cellgen/runtime/train.py, mirroring bidirectional_dynamic_rnn's arguments):
    ``backward((d_out_fw, d_out_bw), (d_state_fw, d_state_bw))`` -> ``grads.params_fw``, ``grads.params_bw``,
    ``grads.inputs``, ``grads.initial_state_fw``, ``grads.initial_state_bw``.
    """
    dtype, tol = np.float64, GRAD_TOL[np.float64]
    case = make_case(name, dtype, time_major=time_major, seed=13)
    mod = case.mod
    rng = np.random.default_rng(14)
    params_bw = random_params(mod, name, dtype, rng)
    state_bw = tuple(rng.standard_normal(s.shape).astype(dtype) for s in case.state)
    d_out_bw = rng.standard_normal(case.d_outputs.shape).astype(dtype)
    d_state_bw = tuple(rng.standard_normal(s.shape).astype(dtype) for s in case.state)

    ((out_fw, out_bw), (st_fw, st_bw)), backward = mod.bidirectional_dynamic_rnn_vjp(
        case.params, params_bw, case.inputs, sequence_length=case.lengths, initial_state_fw=case.state,
        initial_state_bw=state_bw, time_major=time_major, backend=backend, **case.hyper)
    grads = backward((case.d_outputs, d_out_bw), (mod.State(*case.d_state), mod.State(*d_state_bw)))

    p_fw = {k: _leaf(v) for k, v in case.params.items()}
    p_bw = {k: _leaf(v) for k, v in params_bw.items()}
    x = _leaf(case.inputs)
    s_fw = tuple(_leaf(s) for s in case.state)
    s_bw = tuple(_leaf(s) for s in state_bw)
    (rfw, rbw), (rsf, rsb) = tc.bidirectional_dynamic_rnn(name, p_fw, p_bw, x, case.lengths, s_fw, s_bw,
                                                          time_major=time_major, **case.hyper)
    loss = (rfw * torch.from_numpy(case.d_outputs)).sum() + (rbw * torch.from_numpy(d_out_bw)).sum()
    for s, d in zip(rsf + rsb, case.d_state + d_state_bw, strict=True):
        loss = loss + (s * torch.from_numpy(d)).sum()
    loss.backward()

    assert_close(out_fw, rfw.detach().numpy(), tol, "out_fw")
    assert_close(out_bw, rbw.detach().numpy(), tol, "out_bw")
    for a, r in zip(tuple(st_fw) + tuple(st_bw), rsf + rsb, strict=True):
        assert_close(a, r.detach().numpy(), tol, "final states")
    for which, got, leaves in (("fw", grads.params_fw, p_fw), ("bw", grads.params_bw, p_bw)):
        assert set(got) == set(leaves)
        for k, leaf in leaves.items():
            assert_close(got[k], leaf.grad.numpy(), tol, f"grads.params_{which}[{k!r}]")
    assert_close(grads.inputs, x.grad.numpy(), tol, "grads.inputs")
    for which, got, leaves in (("fw", grads.initial_state_fw, s_fw), ("bw", grads.initial_state_bw, s_bw)):
        assert isinstance(got, mod.State)
        for k, (g, leaf) in enumerate(zip(got, leaves, strict=True)):
            assert_close(g, leaf.grad.numpy(), tol, f"grads.initial_state_{which}.{mod.STATE[k]}")
