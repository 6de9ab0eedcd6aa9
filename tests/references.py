"""Independent NumPy reference implementations ("oracle") of the RNN cells cellgen compiles.

Everything here is written directly from the published equations, not from cellgen code:

* TensorFlow 1.x ``tensorflow/python/ops/rnn_cell_impl.py`` -- ``BasicRNNCell``, ``BasicLSTMCell``
  (``state_is_tuple=True``), ``GRUCell`` and ``LSTMCell`` (peepholes, ``cell_clip``, ``num_proj``,
  ``proj_clip``); variable names are TF's without the enclosing variable scope.
* TensorFlow 1.x ``tensorflow/python/ops/rnn.py`` -- ``dynamic_rnn`` (copy-through of state and zero
  outputs past ``sequence_length``), ``bidirectional_dynamic_rnn`` (``reverse_sequence`` of the
  backward direction) and ``MultiRNNCell`` stacking.
* PyTorch ``torch.nn.GRU`` documentation / cuDNN GRU (reset gate applied to the recurrent
  pre-activation *after* the matmul, gate order r, z, n).
* Bradbury, Merity, Xiong, Socher, "Quasi-Recurrent Neural Networks", arXiv:1611.01576 (2016):
  f-, fo- and ifo-pooling.
* Zhou, Wu, Zhang, Zhou, "Minimal Gated Unit for Recurrent Neural Networks", arXiv:1603.09420 (2016).

All arithmetic is done in the floating dtype of the inputs (float32 inputs give float32 results);
parameters, states and hyper-parameters are cast to that dtype.  The sigmoid is evaluated as
``0.5 * tanh(0.5 * x) + 0.5`` so it never overflows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Array = np.ndarray
Params = Mapping[str, Array]
State = tuple[Array, ...]
StepFn = Callable[..., tuple[Array, State]]

__all__ = [
    "STEPS",
    "bidirectional_dynamic_rnn",
    "dynamic_rnn",
    "multi_rnn",
    "output_size",
    "random_params",
    "reverse_sequence",
    "sigmoid",
    "state_sizes",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def sigmoid(x: Array) -> Array:
    """Overflow-free logistic sigmoid, computed in ``x``'s dtype."""
    half = x.dtype.type(0.5)
    return half * np.tanh(half * x) + half


def _param(params: Params, key: str, dtype: np.dtype) -> Array:
    return np.asarray(params[key], dtype=dtype)


def _scalar(value: float, dtype: np.dtype) -> Any:
    return dtype.type(value)


def _split(a: Array, n: int) -> list[Array]:
    return np.split(a, n, axis=1)


def _concat(*arrays: Array) -> Array:
    return np.concatenate(arrays, axis=1)


def _clip(a: Array, bound: float) -> Array:
    b = _scalar(bound, a.dtype)
    return np.clip(a, -b, b)


def _float_dtype(a: Array) -> np.dtype:
    return a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)


# --------------------------------------------------------------------------------------------
# cell steps: step(params, x [B, I], state_tuple, **hyper) -> (output [B, out], new_state_tuple)
# --------------------------------------------------------------------------------------------


def basic_rnn_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """TF BasicRNNCell: h' = tanh([x, h] @ kernel + bias)."""
    (h,) = state
    dt = x.dtype
    h_new = np.tanh(_concat(x, h) @ _param(params, "kernel", dt) + _param(params, "bias", dt))
    return h_new, (h_new,)


def basic_lstm_step(
    params: Params, x: Array, state: State, *, forget_bias: float = 1.0
) -> tuple[Array, State]:
    """TF BasicLSTMCell (state_is_tuple=True), gate order i, j, f, o."""
    c, h = state
    dt = x.dtype
    pre = _concat(x, h) @ _param(params, "kernel", dt) + _param(params, "bias", dt)
    i, j, f, o = _split(pre, 4)
    c_new = c * sigmoid(f + _scalar(forget_bias, dt)) + sigmoid(i) * np.tanh(j)
    h_new = np.tanh(c_new) * sigmoid(o)
    return h_new, (c_new, h_new)


def gru_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """TF GRUCell: reset gate applied to h before the candidate matmul."""
    (h,) = state
    dt = x.dtype
    value = sigmoid(_concat(x, h) @ _param(params, "gates/kernel", dt) + _param(params, "gates/bias", dt))
    r, u = _split(value, 2)
    cand_in = _concat(x, r * h)
    c = np.tanh(cand_in @ _param(params, "candidate/kernel", dt) + _param(params, "candidate/bias", dt))
    h_new = u * h + (1 - u) * c
    return h_new, (h_new,)


def gru_cudnn_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """PyTorch / cuDNN GRU, gate columns r, z, n; reset applied after the recurrent matmul."""
    (h,) = state
    dt = x.dtype
    gx = x @ _param(params, "input/kernel", dt) + _param(params, "input/bias", dt)
    gh = h @ _param(params, "recurrent/kernel", dt) + _param(params, "recurrent/bias", dt)
    gx_r, gx_z, gx_n = _split(gx, 3)
    gh_r, gh_z, gh_n = _split(gh, 3)
    r = sigmoid(gx_r + gh_r)
    z = sigmoid(gx_z + gh_z)
    n = np.tanh(gx_n + r * gh_n)
    h_new = (1 - z) * n + z * h
    return h_new, (h_new,)


def lstm_step(
    params: Params,
    x: Array,
    state: State,
    *,
    forget_bias: float = 1.0,
    cell_clip: float = np.inf,
    proj_clip: float = np.inf,
) -> tuple[Array, State]:
    """TF LSTMCell with peepholes, cell clipping and (optional) clipped projection.

    Without ``projection/kernel`` in ``params`` (TF ``num_proj=None``) the output is ``m`` and
    ``proj_clip`` is ignored, exactly as in TF.
    """
    c, h = state
    dt = x.dtype
    pre = _concat(x, h) @ _param(params, "kernel", dt) + _param(params, "bias", dt)
    i, j, f, o = _split(pre, 4)
    w_f = _param(params, "w_f_diag", dt)
    w_i = _param(params, "w_i_diag", dt)
    w_o = _param(params, "w_o_diag", dt)
    c_new = sigmoid(f + _scalar(forget_bias, dt) + w_f * c) * c + sigmoid(i + w_i * c) * np.tanh(j)
    c_new = _clip(c_new, cell_clip)
    m = sigmoid(o + w_o * c_new) * np.tanh(c_new)
    if "projection/kernel" in params:
        m = _clip(m @ _param(params, "projection/kernel", dt), proj_clip)
    return m, (c_new, m)


def qrnn_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """QRNN fo-pooling with a width-2 convolution window over [x_t, x_{t-1}]."""
    c, x_prev = state
    dt = x.dtype
    pre = _concat(x, x_prev) @ _param(params, "kernel", dt) + _param(params, "bias", dt)
    pz, pf, po = _split(pre, 3)
    z, f, o = np.tanh(pz), sigmoid(pf), sigmoid(po)
    c_new = f * c + (1 - f) * z
    h = o * c_new
    return h, (c_new, x.copy())


def qrnn_f_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """QRNN f-pooling, window 1."""
    (h,) = state
    dt = x.dtype
    pre = x @ _param(params, "kernel", dt) + _param(params, "bias", dt)
    pz, pf = _split(pre, 2)
    z, f = np.tanh(pz), sigmoid(pf)
    h_new = f * h + (1 - f) * z
    return h_new, (h_new,)


def qrnn_ifo_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """QRNN ifo-pooling, window 1, gate order z, f, o, i."""
    (c,) = state
    dt = x.dtype
    pre = x @ _param(params, "kernel", dt) + _param(params, "bias", dt)
    pz, pf, po, pi = _split(pre, 4)
    z, f, o, i = np.tanh(pz), sigmoid(pf), sigmoid(po), sigmoid(pi)
    c_new = f * c + i * z
    h = o * c_new
    return h, (c_new,)


def mgu_step(params: Params, x: Array, state: State) -> tuple[Array, State]:
    """Minimal Gated Unit (Zhou et al. 2016)."""
    (h,) = state
    dt = x.dtype
    f = sigmoid(_concat(x, h) @ _param(params, "forget/kernel", dt) + _param(params, "forget/bias", dt))
    cand_in = _concat(x, f * h)
    h_tilde = np.tanh(cand_in @ _param(params, "candidate/kernel", dt) + _param(params, "candidate/bias", dt))
    h_new = (1 - f) * h + f * h_tilde
    return h_new, (h_new,)


STEPS: dict[str, StepFn] = {
    "basic_rnn": basic_rnn_step,
    "basic_lstm": basic_lstm_step,
    "gru": gru_step,
    "gru_cudnn": gru_cudnn_step,
    "lstm": lstm_step,
    "qrnn": qrnn_step,
    "qrnn_f": qrnn_f_step,
    "qrnn_ifo": qrnn_ifo_step,
    "mgu": mgu_step,
}


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in STEPS:
        raise KeyError(f"unknown cell {name!r}; known: {sorted(STEPS)}")


def state_sizes(name: str, num_units: int, input_size: int, num_proj: int | None = None) -> tuple[int, ...]:
    """Width of each state component, in state-tuple order."""
    _check_name(name)
    if name == "basic_lstm":
        return (num_units, num_units)
    if name == "lstm":
        return (num_units, num_units if num_proj is None else num_proj)
    if name == "qrnn":
        return (num_units, input_size)
    return (num_units,)


def output_size(name: str, num_units: int, input_size: int, num_proj: int | None = None) -> int:
    """Width of the per-step output."""
    _check_name(name)
    if name == "lstm" and num_proj is not None:
        return num_proj
    return num_units


_BIAS_KEY_AND_GATES: dict[str, tuple[str, int]] = {
    "basic_rnn": ("bias", 1),
    "basic_lstm": ("bias", 4),
    "gru": ("candidate/bias", 1),
    "gru_cudnn": ("input/bias", 3),
    "lstm": ("bias", 4),
    "qrnn": ("bias", 3),
    "qrnn_f": ("bias", 2),
    "qrnn_ifo": ("bias", 4),
    "mgu": ("candidate/bias", 1),
}


def _infer_sizes(name: str, params: Params, input_size: int) -> tuple[int, int | None]:
    """(num_units, num_proj) from the parameter shapes."""
    _check_name(name)
    key, gates = _BIAS_KEY_AND_GATES[name]
    num_units = int(np.shape(params[key])[0]) // gates
    num_proj = None
    if name == "lstm" and "projection/kernel" in params:
        num_proj = int(np.shape(params["projection/kernel"])[1])
    return num_units, num_proj


# --------------------------------------------------------------------------------------------
# random parameters
# --------------------------------------------------------------------------------------------


def _param_shapes(name: str, i: int, h: int, num_proj: int | None) -> dict[str, tuple[int, ...]]:
    if name == "basic_rnn":
        return {"kernel": (i + h, h), "bias": (h,)}
    if name == "basic_lstm":
        return {"kernel": (i + h, 4 * h), "bias": (4 * h,)}
    if name == "gru":
        return {
            "gates/kernel": (i + h, 2 * h),
            "gates/bias": (2 * h,),
            "candidate/kernel": (i + h, h),
            "candidate/bias": (h,),
        }
    if name == "gru_cudnn":
        return {
            "input/kernel": (i, 3 * h),
            "input/bias": (3 * h,),
            "recurrent/kernel": (h, 3 * h),
            "recurrent/bias": (3 * h,),
        }
    if name == "lstm":
        p = h if num_proj is None else num_proj
        shapes = {
            "kernel": (i + p, 4 * h),
            "bias": (4 * h,),
            "w_f_diag": (h,),
            "w_i_diag": (h,),
            "w_o_diag": (h,),
        }
        if num_proj is not None:
            shapes["projection/kernel"] = (h, num_proj)
        return shapes
    if name == "qrnn":
        return {"kernel": (2 * i, 3 * h), "bias": (3 * h,)}
    if name == "qrnn_f":
        return {"kernel": (i, 2 * h), "bias": (2 * h,)}
    if name == "qrnn_ifo":
        return {"kernel": (i, 4 * h), "bias": (4 * h,)}
    if name == "mgu":
        return {
            "forget/kernel": (i + h, h),
            "forget/bias": (h,),
            "candidate/kernel": (i + h, h),
            "candidate/bias": (h,),
        }
    raise KeyError(f"unknown cell {name!r}; known: {sorted(STEPS)}")


def random_params(
    name: str,
    input_size: int,
    num_units: int,
    rng: np.random.Generator,
    dtype: Any,
    num_proj: int | None = None,
    scale: float = 0.5,
) -> dict[str, Array]:
    """Uniform(-scale, scale) parameters with the names/shapes used by ``STEPS[name]``.

    For ``lstm`` with ``num_proj=None`` no ``projection/kernel`` is produced (TF semantics).
    """
    shapes = _param_shapes(name, input_size, num_units, num_proj)
    return {key: rng.uniform(-scale, scale, size=shape).astype(dtype) for key, shape in shapes.items()}


# --------------------------------------------------------------------------------------------
# dynamic_rnn family (TF 1.x semantics)
# --------------------------------------------------------------------------------------------

Nested = Any  # an Array or an arbitrarily nested tuple of Arrays


def _tree_where(mask: Array, new: Nested, old: Nested) -> Nested:
    if isinstance(new, tuple):
        return tuple(_tree_where(mask, n, o) for n, o in zip(new, old, strict=True))
    return np.where(mask, new, old)


def _lengths(sequence_length: Sequence[int] | Array | None, batch: int, steps: int) -> Array:
    if sequence_length is None:
        return np.full(batch, steps, dtype=np.int64)
    lengths = np.asarray(sequence_length, dtype=np.int64).reshape(-1)
    if lengths.shape[0] != batch:
        raise ValueError(f"sequence_length has {lengths.shape[0]} entries for batch {batch}")
    if np.any(lengths < 0):
        raise ValueError("sequence_length must be non-negative")
    return lengths


def _to_batch_major(inputs: Array, time_major: bool) -> Array:
    inputs = np.asarray(inputs)
    if inputs.ndim != 3:
        raise ValueError(f"inputs must be rank 3, got shape {inputs.shape}")
    inputs = inputs.astype(_float_dtype(inputs), copy=False)
    return np.swapaxes(inputs, 0, 1) if time_major else inputs


def _zero_state(sizes: tuple[int, ...], batch: int, dtype: np.dtype) -> State:
    return tuple(np.zeros((batch, s), dtype=dtype) for s in sizes)


def _cast_state(state: Sequence[Array], sizes: tuple[int, ...], batch: int, dtype: np.dtype) -> State:
    if len(state) != len(sizes):
        raise ValueError(f"state has {len(state)} components, expected {len(sizes)}")
    cast = tuple(np.array(s, dtype=dtype) for s in state)
    for s, size in zip(cast, sizes, strict=True):
        if s.shape != (batch, size):
            raise ValueError(f"state component of shape {s.shape}, expected {(batch, size)}")
    return cast


def _run_loop(
    step: Callable[[Array, Nested], tuple[Array, Nested]],
    x_bm: Array,
    lengths: Array,
    state: Nested,
    out_width: int,
) -> tuple[Array, Nested]:
    """The dynamic_rnn time loop: zero outputs and copied-through state where t >= length."""
    batch, steps, _ = x_bm.shape
    outputs = np.zeros((batch, steps, out_width), dtype=x_bm.dtype)
    for t in range(steps):
        out, new_state = step(x_bm[:, t, :], state)
        valid = (t < lengths)[:, None]
        outputs[:, t, :] = np.where(valid, out, np.zeros((), dtype=x_bm.dtype))
        state = _tree_where(valid, new_state, state)
    return outputs, state


def _restore_layout(outputs: Array, time_major: bool) -> Array:
    return np.swapaxes(outputs, 0, 1) if time_major else outputs


def dynamic_rnn(
    name: str,
    params: Params,
    inputs: Array,
    sequence_length: Sequence[int] | Array | None = None,
    initial_state: Sequence[Array] | None = None,
    time_major: bool = False,
    **hyper: Any,
) -> tuple[Array, State]:
    """tf.nn.dynamic_rnn with a single ``name`` cell, as a plain Python loop over time."""
    x_bm = _to_batch_major(inputs, time_major)
    batch, steps, input_size = x_bm.shape
    dt = x_bm.dtype
    num_units, num_proj = _infer_sizes(name, params, input_size)
    sizes = state_sizes(name, num_units, input_size, num_proj)
    state = _zero_state(sizes, batch, dt) if initial_state is None else _cast_state(initial_state, sizes, batch, dt)
    lengths = _lengths(sequence_length, batch, steps)
    step_fn = STEPS[name]

    def step(x: Array, s: State) -> tuple[Array, State]:
        return step_fn(params, x, s, **hyper)

    out_width = output_size(name, num_units, input_size, num_proj)
    outputs, final = _run_loop(step, x_bm, lengths, state, out_width)
    return _restore_layout(outputs, time_major), final


def reverse_sequence(x_bm: Array, lengths: Array) -> Array:
    """tf.reverse_sequence on a batch-major [B, T, ...] array (seq_axis=1, batch_axis=0)."""
    out = x_bm.copy()
    steps = x_bm.shape[1]
    for b, length in enumerate(lengths):
        n = min(int(length), steps)
        out[b, :n] = x_bm[b, :n][::-1]
    return out


def bidirectional_dynamic_rnn(
    name: str,
    params_fw: Params,
    params_bw: Params,
    inputs: Array,
    sequence_length: Sequence[int] | Array | None = None,
    initial_state_fw: Sequence[Array] | None = None,
    initial_state_bw: Sequence[Array] | None = None,
    time_major: bool = False,
    **hyper: Any,
) -> tuple[tuple[Array, Array], tuple[State, State]]:
    """tf.nn.bidirectional_dynamic_rnn with the same cell type in both directions."""
    x_bm = _to_batch_major(inputs, time_major)
    batch, steps, _ = x_bm.shape
    lengths = _lengths(sequence_length, batch, steps)
    out_fw, state_fw = dynamic_rnn(name, params_fw, x_bm, lengths, initial_state_fw, **hyper)
    rev_in = reverse_sequence(x_bm, lengths)
    rev_out, state_bw = dynamic_rnn(name, params_bw, rev_in, lengths, initial_state_bw, **hyper)
    out_bw = reverse_sequence(rev_out, lengths)
    return (
        (_restore_layout(out_fw, time_major), _restore_layout(out_bw, time_major)),
        (state_fw, state_bw),
    )


def multi_rnn(
    layers: Sequence[tuple[str, Params, Mapping[str, Any]]],
    inputs: Array,
    sequence_length: Sequence[int] | Array | None = None,
    initial_states: Sequence[Sequence[Array] | None] | None = None,
    time_major: bool = False,
) -> tuple[Array, tuple[State, ...]]:
    """tf.nn.dynamic_rnn over tf.nn.rnn_cell.MultiRNNCell(layers)."""
    if not layers:
        raise ValueError("multi_rnn needs at least one layer")
    x_bm = _to_batch_major(inputs, time_major)
    batch, steps, width = x_bm.shape
    dt = x_bm.dtype
    if initial_states is not None and len(initial_states) != len(layers):
        raise ValueError(f"{len(initial_states)} initial states for {len(layers)} layers")
    states: list[State] = []
    for k, (name, params, _hyper) in enumerate(layers):
        num_units, num_proj = _infer_sizes(name, params, width)
        sizes = state_sizes(name, num_units, width, num_proj)
        init = None if initial_states is None else initial_states[k]
        states.append(_zero_state(sizes, batch, dt) if init is None else _cast_state(init, sizes, batch, dt))
        width = output_size(name, num_units, width, num_proj)

    def step(x: Array, stacked: tuple[State, ...]) -> tuple[Array, tuple[State, ...]]:
        new_states = []
        for (name, params, hyper), s in zip(layers, stacked, strict=True):
            x, s_new = STEPS[name](params, x, s, **dict(hyper))
            new_states.append(s_new)
        return x, tuple(new_states)

    lengths = _lengths(sequence_length, batch, steps)
    outputs, final = _run_loop(step, x_bm, lengths, tuple(states), width)
    return _restore_layout(outputs, time_major), final
