"""Independent PyTorch references of shipped cells, for the gradient tests (tests/test_training_torch.py).

Written from the published equations and APIs, never from cellgen's specs or generated code:

* ``torch.nn.LSTM`` / ``torch.nn.GRU`` themselves (one layer) do the math of ``basic_lstm`` and
  ``gru_cudnn``: TF parameters are converted into PyTorch's ``weight_ih_l0``, ``weight_hh_l0``,
  ``bias_ih_l0``, ``bias_hh_l0`` by differentiable tensor ops, and the module runs with them through
  ``torch.func.functional_call``, so autograd gives the gradients of the TF parameters directly.
  Ragged lengths go through ``pack_padded_sequence`` (rows of length 0, which packing refuses, keep
  their initial state and get zero outputs) or, with ``mode="steps"``, one module call per time step
  with the dynamic_rnn mask.
* Eager cells from TensorFlow 1.x ``rnn_cell_impl.py``: ``LSTMCell(use_peepholes=True, cell_clip,
  num_proj, proj_clip)`` and ``GRUCell``; and QRNN fo-pooling with a window of 2 (Bradbury et al.,
  "Quasi-Recurrent Neural Networks", arXiv:1611.01576), each in a masked time loop.

Every reference has the signature of TF 1.x ``tf.nn.dynamic_rnn``::

    outputs, final_state = REFERENCES[name](params, inputs, sequence_length=None, initial_state=None,
                                            time_major=False, **hyper)

``params``: TF names (as a generated module's ``init_params`` makes them) -> torch tensors (NumPy
arrays are converted); ``inputs``: a torch tensor [B, T, I] (``[T, B, I]`` when ``time_major``);
``initial_state``: a tuple of [B, size] tensors in the TF state order (``None``: zeros). They return
``outputs`` [B, T, out] (``[T, B, out]`` when ``time_major``) and the final state tuple, as tensors of
the inputs' dtype that carry autograd. Past each row's length the output is zero and the state is
copied through (``torch.where``, so no gradient flows through the masked steps).

Clips use ``torch.clamp``, whose gradient passes where ``lo <= v <= hi``, like TF's
``clip_by_value`` (they differ only exactly at a tie, which random data never hits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

Tensor = torch.Tensor
State = tuple[Tensor, ...]

__all__ = [
    "LSTM_TORCH_FROM_TF",
    "REFERENCES",
    "basic_lstm",
    "bidirectional_dynamic_rnn",
    "gru",
    "gru_cudnn",
    "gru_weights_from_tf",
    "gru_weights_to_tf",
    "lstm",
    "lstm_weights_from_tf",
    "lstm_weights_to_tf",
    "make_module",
    "nn_dynamic_rnn",
    "qrnn",
    "reverse_sequence",
]

#: PyTorch's LSTM gate blocks are (i, f, g, o); TF's BasicLSTMCell/LSTMCell columns are (i, j, f, o),
#: j being PyTorch's g. Block k of PyTorch's weights is block LSTM_TORCH_FROM_TF[k] of TF's (the
#: permutation is its own inverse).
LSTM_TORCH_FROM_TF = (0, 2, 1, 3)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _tensor(a: Any, dtype: torch.dtype | None = None) -> Tensor:
    """``a`` as a tensor (a tensor keeps its graph; ``dtype`` casts differentiably)."""
    t = a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _params(params: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: _tensor(v, dtype) for k, v in params.items()}


def _reorder_blocks(a: Tensor, n: int, order: Sequence[int], dim: int) -> Tensor:
    """The ``n`` equal blocks of ``a`` along ``dim``, concatenated in ``order``."""
    width = a.shape[dim] // n
    if width * n != a.shape[dim]:
        raise ValueError(f"dimension {dim} of shape {tuple(a.shape)} is not {n} equal blocks")
    return torch.cat([a.narrow(dim, k * width, width) for k in order], dim=dim)


def _lengths(sequence_length: Any, batch: int, steps: int) -> np.ndarray:
    if sequence_length is None:
        return np.full(batch, steps, dtype=np.int64)
    if isinstance(sequence_length, Tensor):
        sequence_length = sequence_length.detach().cpu().numpy()
    lengths = np.asarray(sequence_length, dtype=np.int64).reshape(-1)
    if lengths.shape != (batch,) or np.any(lengths < 0) or np.any(lengths > steps):
        raise ValueError(f"sequence_length must be [{batch}] ints in [0, {steps}], got {lengths}")
    return lengths


def _batch_major(inputs: Any, time_major: bool) -> Tensor:
    x = _tensor(inputs)
    if x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"inputs must be a rank-3 float tensor, got {tuple(x.shape)} {x.dtype}")
    return x.transpose(0, 1) if time_major else x


def _layout(outputs: Tensor, time_major: bool) -> Tensor:
    return outputs.transpose(0, 1) if time_major else outputs


def _initial(initial_state: Sequence[Any] | None, sizes: Sequence[int], batch: int, like: Tensor) -> State:
    if initial_state is None:
        return tuple(like.new_zeros(batch, n) for n in sizes)
    state = tuple(_tensor(s, like.dtype) for s in initial_state)
    if tuple(tuple(s.shape) for s in state) != tuple((batch, n) for n in sizes):
        raise ValueError(f"initial_state shapes {[tuple(s.shape) for s in state]}, expected "
                         f"{[(batch, n) for n in sizes]}")
    return state


def _clip(v: Tensor, bound: float | None) -> Tensor:
    """TF's ``clip_by_value(v, -bound, bound)``; ``None`` (TF) or inf: no clipping."""
    if bound is None or math.isinf(bound):
        return v
    return torch.clamp(v, -bound, bound)


def _masked_loop(step: Callable[[Tensor, State], tuple[Tensor, State]], x_bm: Tensor, lengths: np.ndarray,
                 state: State, out_width: int) -> tuple[Tensor, State]:
    """TF ``dynamic_rnn``'s loop: outputs zero and states copied through where t >= length."""
    batch, steps, _ = x_bm.shape
    lens = torch.as_tensor(lengths)
    outputs = []
    for t in range(steps):
        out, new = step(x_bm[:, t], state)
        valid = (t < lens)[:, None]
        outputs.append(torch.where(valid, out, torch.zeros_like(out)))
        state = tuple(torch.where(valid, n, o) for n, o in zip(new, state, strict=True))
    if not outputs:
        return x_bm.new_zeros(batch, 0, out_width), state
    return torch.stack(outputs, dim=1), state


# --------------------------------------------------------------------------------------------
# TF parameters <-> torch.nn.LSTM / torch.nn.GRU weights (layer 0)
# --------------------------------------------------------------------------------------------


def lstm_weights_from_tf(params: Mapping[str, Any], forget_bias: float = 1.0,
                         dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """TF BasicLSTMCell ``kernel [I+H, 4H]`` (columns i, j, f, o), ``bias [4H]`` -> nn.LSTM's weights.

    PyTorch: gates = x W_ih^T + b_ih + h W_hh^T + b_hh, blocks (i, f, g, o). TF: [x, h] @ kernel + bias,
    blocks (i, j, f, o), and ``forget_bias`` added to f only. So W_ih is the x rows of the reordered
    kernel transposed, W_hh its h rows transposed, b_ih the reordered TF bias, and b_hh carries
    ``forget_bias`` in its f block (zeros elsewhere). Differentiable in ``params``.
    """
    kernel = _tensor(params["kernel"], dtype)
    bias = _tensor(params["bias"], kernel.dtype)
    hidden = kernel.shape[1] // 4
    inputs = kernel.shape[0] - hidden
    k = _reorder_blocks(kernel, 4, LSTM_TORCH_FROM_TF, dim=1)
    bias_hh = torch.zeros(4 * hidden, dtype=kernel.dtype)
    bias_hh[hidden: 2 * hidden] = forget_bias  # torch block 1 is f
    return {
        "weight_ih_l0": k[:inputs].T,
        "weight_hh_l0": k[inputs:].T,
        "bias_ih_l0": _reorder_blocks(bias, 4, LSTM_TORCH_FROM_TF, dim=0),
        "bias_hh_l0": bias_hh,
    }


def lstm_weights_to_tf(weights: Mapping[str, Any], forget_bias: float = 1.0) -> dict[str, np.ndarray]:
    """The inverse of :func:`lstm_weights_from_tf` (both torch biases summed, ``forget_bias`` taken off f)."""
    w = {k: _tensor(v).detach() for k, v in weights.items()}
    hidden = w["weight_hh_l0"].shape[1]
    kernel = torch.cat([w["weight_ih_l0"].T, w["weight_hh_l0"].T], dim=0)
    bias = (w["bias_ih_l0"] + w["bias_hh_l0"]).clone()
    bias[hidden: 2 * hidden] -= forget_bias
    return {
        "kernel": _reorder_blocks(kernel, 4, LSTM_TORCH_FROM_TF, dim=1).numpy(),
        "bias": _reorder_blocks(bias, 4, LSTM_TORCH_FROM_TF, dim=0).numpy(),
    }


def gru_weights_from_tf(params: Mapping[str, Any], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """cuDNN-GRU TF names -> nn.GRU's weights: the same gate order (r, z, n), kernels transposed.

    ``recurrent/bias`` is ``bias_hh_l0`` (inside ``r * (h W_hn + b_hn)``), ``input/bias`` ``bias_ih_l0``.
    """
    w_i = _tensor(params["input/kernel"], dtype)
    dt = w_i.dtype
    return {
        "weight_ih_l0": w_i.T,
        "weight_hh_l0": _tensor(params["recurrent/kernel"], dt).T,
        "bias_ih_l0": _tensor(params["input/bias"], dt),
        "bias_hh_l0": _tensor(params["recurrent/bias"], dt),
    }


def gru_weights_to_tf(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`gru_weights_from_tf`."""
    w = {k: _tensor(v).detach() for k, v in weights.items()}
    return {
        "input/kernel": w["weight_ih_l0"].T.numpy(),
        "input/bias": w["bias_ih_l0"].numpy(),
        "recurrent/kernel": w["weight_hh_l0"].T.numpy(),
        "recurrent/bias": w["bias_hh_l0"].numpy(),
    }


def make_module(kind: str, input_size: int, hidden_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """A one-layer, batch-first ``nn.LSTM`` (kind "lstm") or ``nn.GRU`` (kind "gru") with biases.

    Its own (random) parameters are never used: :func:`nn_dynamic_rnn` runs it with given weights.
    """
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    return cls(input_size, hidden_size, num_layers=1, bias=True, batch_first=True, bidirectional=False,
               dtype=dtype)


def nn_dynamic_rnn(module: torch.nn.Module, weights: Mapping[str, Tensor], x_bm: Tensor, lengths: np.ndarray,
                   hx: State, mode: str = "packed") -> tuple[Tensor, State]:
    """Run ``module`` (nn.LSTM / nn.GRU, batch-first) with ``weights`` under TF dynamic_rnn semantics.

    ``hx``: torch's state order, (h, c) for an LSTM, (h,) for a GRU, each [B, H]. Returns outputs
    [B, T, H] (zero past each length) and the final (h, c) / (h,) at each row's last valid step
    (the initial state for a row of length 0).
    """
    is_lstm = isinstance(module, torch.nn.LSTM)
    batch, steps, _ = x_bm.shape
    hidden = module.hidden_size

    def call(x: Tensor, state: State) -> tuple[Tensor, State]:
        h0 = tuple(s.unsqueeze(0) for s in state)  # [num_layers = 1, B, H]
        y, h_n = functional_call(module, dict(weights), (x, h0 if is_lstm else h0[0]))
        h_n = h_n if is_lstm else (h_n,)
        return y, tuple(s.squeeze(0) for s in h_n)

    if mode == "packed":
        outputs = x_bm.new_zeros(batch, steps, hidden)
        rows = np.flatnonzero(lengths > 0)
        if rows.size == 0:
            return outputs, hx
        idx = torch.as_tensor(rows)
        packed = pack_padded_sequence(x_bm.index_select(0, idx), torch.as_tensor(lengths[rows]),
                                      batch_first=True, enforce_sorted=False)
        y, finals = call(packed, tuple(s.index_select(0, idx) for s in hx))
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=steps)
        return (outputs.index_copy(0, idx, y),
                tuple(s.index_copy(0, idx, f) for s, f in zip(hx, finals, strict=True)))
    if mode == "steps":
        def step(x: Tensor, state: State) -> tuple[Tensor, State]:
            y, new = call(x[:, None], state)
            return y[:, 0], new

        return _masked_loop(step, x_bm, lengths, hx, hidden)
    raise ValueError(f"mode must be 'packed' or 'steps', got {mode!r}")


def basic_lstm(params: Mapping[str, Any], inputs: Any, sequence_length: Any = None,
               initial_state: Sequence[Any] | None = None, *, time_major: bool = False, forget_bias: float = 1.0,
               mode: str = "packed") -> tuple[Tensor, State]:
    """TF BasicLSTMCell under dynamic_rnn, computed by ``torch.nn.LSTM``; state (c, h) in TF order."""
    x = _batch_major(inputs, time_major)
    batch, steps, input_size = x.shape
    weights = lstm_weights_from_tf(params, forget_bias, x.dtype)
    hidden = weights["weight_hh_l0"].shape[1]
    c0, h0 = _initial(initial_state, (hidden, hidden), batch, x)
    module = make_module("lstm", input_size, hidden, x.dtype)
    out, (h, c) = nn_dynamic_rnn(module, weights, x, _lengths(sequence_length, batch, steps), (h0, c0), mode)
    return _layout(out, time_major), (c, h)


def gru_cudnn(params: Mapping[str, Any], inputs: Any, sequence_length: Any = None,
              initial_state: Sequence[Any] | None = None, *, time_major: bool = False,
              mode: str = "packed") -> tuple[Tensor, State]:
    """The cuDNN GRU under dynamic_rnn, computed by ``torch.nn.GRU``; state (h,)."""
    x = _batch_major(inputs, time_major)
    batch, steps, input_size = x.shape
    weights = gru_weights_from_tf(params, x.dtype)
    hidden = weights["weight_hh_l0"].shape[1]
    state = _initial(initial_state, (hidden,), batch, x)
    module = make_module("gru", input_size, hidden, x.dtype)
    out, final = nn_dynamic_rnn(module, weights, x, _lengths(sequence_length, batch, steps), state, mode)
    return _layout(out, time_major), final


# --------------------------------------------------------------------------------------------
# eager cells (TF 1.x rnn_cell_impl.py; QRNN paper)
# --------------------------------------------------------------------------------------------


def lstm(params: Mapping[str, Any], inputs: Any, sequence_length: Any = None,
         initial_state: Sequence[Any] | None = None, *, time_major: bool = False, forget_bias: float = 1.0,
         cell_clip: float | None = None, proj_clip: float | None = None) -> tuple[Tensor, State]:
    """TF LSTMCell(use_peepholes=True, cell_clip, num_proj, proj_clip); state (c [H], m [P]).

    As in TF's ``LSTMCell.call``::

        i, j, f, o = split(matmul(concat([inputs, m_prev], 1), kernel) + bias, 4, axis=1)
        c = sigmoid(f + forget_bias + w_f_diag * c_prev) * c_prev + sigmoid(i + w_i_diag * c_prev) * tanh(j)
        c = clip_by_value(c, -cell_clip, cell_clip)
        m = sigmoid(o + w_o_diag * c) * tanh(c)
        m = clip_by_value(matmul(m, projection/kernel), -proj_clip, proj_clip)

    Without ``projection/kernel`` (TF ``num_proj=None``) m is not projected and ``proj_clip`` is unused.
    """
    x = _batch_major(inputs, time_major)
    batch, steps, _ = x.shape
    p = _params(params, x.dtype)
    kernel, bias = p["kernel"], p["bias"]
    hidden = bias.shape[0] // 4
    proj = p.get("projection/kernel")
    width = hidden if proj is None else proj.shape[1]

    def step(x_t: Tensor, state: State) -> tuple[Tensor, State]:
        c_prev, m_prev = state
        i, j, f, o = torch.split(torch.cat([x_t, m_prev], dim=1) @ kernel + bias, hidden, dim=1)
        c = (torch.sigmoid(f + forget_bias + p["w_f_diag"] * c_prev) * c_prev
             + torch.sigmoid(i + p["w_i_diag"] * c_prev) * torch.tanh(j))
        c = _clip(c, cell_clip)
        m = torch.sigmoid(o + p["w_o_diag"] * c) * torch.tanh(c)
        if proj is not None:
            m = _clip(m @ proj, proj_clip)
        return m, (c, m)

    state = _initial(initial_state, (hidden, width), batch, x)
    out, final = _masked_loop(step, x, _lengths(sequence_length, batch, steps), state, width)
    return _layout(out, time_major), final


def gru(params: Mapping[str, Any], inputs: Any, sequence_length: Any = None,
        initial_state: Sequence[Any] | None = None, *, time_major: bool = False) -> tuple[Tensor, State]:
    """TF GRUCell; state (h,). As in TF's ``GRUCell.call``::

        r, u = split(sigmoid(matmul(concat([inputs, state], 1), gates/kernel) + gates/bias), 2, axis=1)
        c = tanh(matmul(concat([inputs, r * state], 1), candidate/kernel) + candidate/bias)
        new_h = u * state + (1 - u) * c
    """
    x = _batch_major(inputs, time_major)
    batch, steps, _ = x.shape
    p = _params(params, x.dtype)
    hidden = p["candidate/bias"].shape[0]

    def step(x_t: Tensor, state: State) -> tuple[Tensor, State]:
        (h,) = state
        value = torch.sigmoid(torch.cat([x_t, h], dim=1) @ p["gates/kernel"] + p["gates/bias"])
        r, u = torch.split(value, hidden, dim=1)
        c = torch.tanh(torch.cat([x_t, r * h], dim=1) @ p["candidate/kernel"] + p["candidate/bias"])
        new_h = u * h + (1 - u) * c
        return new_h, (new_h,)

    state = _initial(initial_state, (hidden,), batch, x)
    out, final = _masked_loop(step, x, _lengths(sequence_length, batch, steps), state, hidden)
    return _layout(out, time_major), final


def qrnn(params: Mapping[str, Any], inputs: Any, sequence_length: Any = None,
         initial_state: Sequence[Any] | None = None, *, time_major: bool = False) -> tuple[Tensor, State]:
    """QRNN with fo-pooling and a width-2 convolution over [x_t, x_{t-1}]; state (c [H], x_prev [I]).

    Bradbury et al. (2016), eq. 1 with k = 2 and fo-pooling (eq. 4)::

        z, f, o = [x_t, x_{t-1}] @ kernel + bias     (kernel rows: x_t first, then x_{t-1})
        z = tanh(z), f = sigmoid(f), o = sigmoid(o)
        c_t = f * c_{t-1} + (1 - f) * z,   h_t = o * c_t

    x_{-1} is the initial ``x_prev``; the final ``x_prev`` is each row's last valid input.
    """
    x = _batch_major(inputs, time_major)
    batch, steps, input_size = x.shape
    p = _params(params, x.dtype)
    hidden = p["bias"].shape[0] // 3

    def step(x_t: Tensor, state: State) -> tuple[Tensor, State]:
        c, x_prev = state
        pz, pf, po = torch.split(torch.cat([x_t, x_prev], dim=1) @ p["kernel"] + p["bias"], hidden, dim=1)
        z, f, o = torch.tanh(pz), torch.sigmoid(pf), torch.sigmoid(po)
        c_new = f * c + (1 - f) * z
        return o * c_new, (c_new, x_t)

    state = _initial(initial_state, (hidden, input_size), batch, x)
    out, final = _masked_loop(step, x, _lengths(sequence_length, batch, steps), state, hidden)
    return _layout(out, time_major), final


#: cell name (a shipped spec) -> its torch reference, with tf.nn.dynamic_rnn's signature.
REFERENCES: dict[str, Callable[..., tuple[Tensor, State]]] = {
    "basic_lstm": basic_lstm,
    "gru_cudnn": gru_cudnn,
    "lstm": lstm,
    "gru": gru,
    "qrnn": qrnn,
}


# --------------------------------------------------------------------------------------------
# bidirectional (TF 1.x rnn.py)
# --------------------------------------------------------------------------------------------


def reverse_sequence(x_bm: Tensor, lengths: np.ndarray) -> Tensor:
    """TF's ``reverse_sequence(x, lengths, seq_axis=1, batch_axis=0)``: each row's first lengths[b]
    steps reversed, the rest in place (a gather, so differentiable)."""
    batch, steps = x_bm.shape[:2]
    t = np.arange(steps)[None, :]
    n = np.asarray(lengths)[:, None]
    index = torch.as_tensor(np.where(t < n, n - 1 - t, t))  # [B, T]
    return torch.gather(x_bm, 1, index[:, :, None].expand(batch, steps, x_bm.shape[2]))


def bidirectional_dynamic_rnn(name: str, params_fw: Mapping[str, Any], params_bw: Mapping[str, Any], inputs: Any,
                              sequence_length: Any = None, initial_state_fw: Sequence[Any] | None = None,
                              initial_state_bw: Sequence[Any] | None = None, *, time_major: bool = False,
                              **hyper: Any) -> tuple[tuple[Tensor, Tensor], tuple[State, State]]:
    """TF 1.x ``bidirectional_dynamic_rnn`` over ``REFERENCES[name]``: the backward direction runs on
    ``reverse_sequence(inputs, lengths)`` and its outputs are reversed back."""
    fn = REFERENCES[name]
    x = _batch_major(inputs, time_major)
    lengths = _lengths(sequence_length, x.shape[0], x.shape[1])
    out_fw, st_fw = fn(params_fw, x, lengths, initial_state_fw, **hyper)
    out_bw, st_bw = fn(params_bw, reverse_sequence(x, lengths), lengths, initial_state_bw, **hyper)
    out_bw = reverse_sequence(out_bw, lengths)
    return (_layout(out_fw, time_major), _layout(out_bw, time_major)), (st_fw, st_bw)
