"""Training: ``dynamic_rnn_vjp`` and ``bidirectional_dynamic_rnn_vjp``, TF 1.x semantics (docs/training.md).

A backend's ``BackendRun.vjp(packed, params, xs, lengths, states, hyper, sizes, recompute)`` runs
the forward that saves what its backward needs and returns ``(out [T, B, out], finals, back)``;
``back(d_out [T, B, out], d_finals)`` (the recurrent states' adjoints) returns the parameters'
adjoints, the inputs' [T, B, in] and every initial state's (a delay state's: what its x_{-1}
received). This module wraps that in the user's API: argument checks, batch- or time-major
layouts, the delay state's final value (the input at each row's last step) and its adjoint,
and a ``backward`` that can be called once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from cellgen.runtime import checks, half_train
from cellgen.runtime.driver import BackendRun, Call, CellInfo, backend_run, prepare_directions, reverse_sequence


@dataclass(frozen=True)
class Gradients:
    """``backward``'s result: the adjoints of ``params`` (same TF names and shapes), ``inputs``
    (same layout as the call's) and ``initial_state`` (a State)."""

    params: dict[str, Any]
    inputs: Any
    initial_state: Any


@dataclass(frozen=True)
class BidirectionalGradients:
    """``bidirectional_dynamic_rnn_vjp``'s ``backward`` result."""

    params_fw: dict[str, Any]
    params_bw: dict[str, Any]
    inputs: Any
    initial_state_fw: Any
    initial_state_bw: Any


class _Once:
    """A backward that may run once: its saved activations are released after it."""

    def __init__(self, what: str) -> None:
        self.what, self.used = what, False

    def check(self) -> None:
        if self.used:
            raise RuntimeError(f"{self.what}'s backward was already called: it frees the forward's saved "
                               "values; call the vjp function again for another backward")
        self.used = True


def _time_major(value, name: str, shape: tuple[int, int, int], time_major: bool, dtype) -> np.ndarray:
    """A user's [B, T, n] (or [T, B, n]) adjoint (host memory) as a contiguous [T, B, n] array of ``dtype``."""
    t, b, n = shape
    want = (t, b, n) if time_major else (b, t, n)
    arr = value
    if arr.shape != want:
        layout = "[max_time, batch_size, output_size]" if time_major else "[batch_size, max_time, output_size]"
        raise ValueError(f"{name} must have the outputs' shape {layout} = {want}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be float32 or float64, got {arr.dtype}")
    return np.ascontiguousarray(arr if time_major else arr.transpose(1, 0, 2), dtype=dtype)


def _state_adjoints(cell: CellInfo, d_state, states: list[Any], name: str, host) -> list[np.ndarray]:
    """The final states' adjoints (None: zeros), one host [B, size] array per state, STATE order;
    ``host`` makes an array (a device one too) a NumPy array."""
    if d_state is None:
        return [np.zeros(tuple(s.shape), dtype=np.dtype(s.dtype)) for s in states]
    if isinstance(d_state, np.ndarray) or not isinstance(d_state, tuple | list):
        if len(states) == 1 and hasattr(d_state, "shape"):
            d_state = (d_state,)
        else:
            raise ValueError(f"{name} must be a State of {len(states)} arrays ({', '.join(cell.state)}) or None")
    if len(d_state) != len(states):
        raise ValueError(f"{name} must have {len(states)} states ({', '.join(cell.state)}), got {len(d_state)}")
    out = []
    for state, value, final in zip(cell.state, d_state, states, strict=True):
        shape, dtype = tuple(final.shape), np.dtype(final.dtype)
        arr = np.zeros(shape, dtype=dtype) if value is None else host(value)
        if arr.shape != shape:
            raise ValueError(f"{name}.{state} must have the final state's shape {shape}, got {arr.shape}")
        out.append(np.array(arr, dtype=dtype, order="C"))
    return out


def vjp_call(cell: CellInfo, entry: BackendRun, call: Call, recompute: bool):
    """The time-major forward of one checked call and its backward, with the delay states' parts.

    Returns ``(out [T, B, out], states, back)``; ``back(d_out [T, B, out], d_states)`` returns
    ``(param adjoints, input adjoints [T, B, in], initial state adjoints)``.
    """
    if entry.vjp is None:
        raise ValueError("this backend has no backward (training): use backend='cpu' or 'reference'")
    packed = cell.pack(call.params, call.sizes) if entry.packs else None
    out, finals, back = entry.vjp(packed, call.params, call.xs, call.lengths, call.states, call.hyper, call.sizes,
                                  recompute)
    finals = iter(finals)
    states = [entry.arrays.last_input(call, k) if delay else next(finals)
              for k, delay in enumerate(cell.input_state)]
    lengths = entry.arrays.to_host(call.lengths)

    def backward(d_out: np.ndarray, d_states: list[np.ndarray]):
        grads, d_xs, d_init = back(d_out, [d for d, delay in zip(d_states, cell.input_state, strict=True)
                                           if not delay])
        d_init = list(d_init)
        for k, delay in enumerate(cell.input_state):
            if delay:  # the final x_prev is the input at each row's last step; length 0: the initial one
                rows = np.nonzero(lengths > 0)[0]
                d_xs[lengths[rows] - 1, rows] += d_states[k][rows]
                empty = lengths == 0
                d_init[k] = d_init[k] + np.where(empty[:, None], d_states[k], 0).astype(d_init[k].dtype)
        return grads, d_xs, d_init

    return out, states, backward


def dynamic_rnn_vjp(cell: CellInfo, params, inputs, *, sequence_length=None, initial_state=None, time_major=False,
                    backend="cpu", recompute=False, hyper=None):
    """``((outputs, state), backward)``; ``backward(d_outputs, d_state=None)`` -> :class:`Gradients`."""
    if checks.half_name(inputs) is not None:  # float32 training on the storage values (cellgen.runtime.half_train)
        return half_train.dynamic_rnn_vjp(partial(dynamic_rnn_vjp, cell), cell.state_class, params, inputs,
                                          backend=backend, sequence_length=sequence_length,
                                          initial_state=initial_state, time_major=time_major, recompute=recompute,
                                          hyper=hyper)
    entry = backend_run(cell, backend)
    call = entry.arrays.prepare(cell, params, inputs, sequence_length, initial_state, time_major, hyper or {})
    out, states, back = vjp_call(cell, entry, call, bool(recompute))
    outputs, state = entry.arrays.finish(cell, out, states, time_major, call)
    once = _Once("dynamic_rnn_vjp")
    shape, host = tuple(out.shape), entry.arrays.to_host

    def backward(d_outputs, d_state=None) -> Gradients:
        d_out = _time_major(host(d_outputs), "d_outputs", shape, time_major, np.dtype(out.dtype))
        d_states = _state_adjoints(cell, d_state, states, "d_state", host)
        once.check()
        grads, d_xs, d_init = back(d_out, d_states)
        return _gradients(entry, call, grads, params, d_xs, time_major, d_init, cell)

    return (outputs, state), backward


def bidirectional_dynamic_rnn_vjp(cell: CellInfo, params_fw, params_bw, inputs, *, sequence_length=None,
                                  initial_state_fw=None, initial_state_bw=None, time_major=False, backend="cpu",
                                  recompute=False, hyper=None):
    """``(((out_fw, out_bw), (state_fw, state_bw)), backward)``; ``backward((d_out_fw, d_out_bw),
    (d_state_fw, d_state_bw))`` -> :class:`BidirectionalGradients`."""
    if checks.half_name(inputs) is not None:
        return half_train.bidirectional_dynamic_rnn_vjp(
            partial(bidirectional_dynamic_rnn_vjp, cell), cell.state_class, params_fw, params_bw, inputs,
            backend=backend, sequence_length=sequence_length, initial_state_fw=initial_state_fw,
            initial_state_bw=initial_state_bw, time_major=time_major, recompute=recompute, hyper=hyper)
    hyper = hyper or {}
    entry = backend_run(cell, backend)
    arrays = entry.arrays
    fw, bw = prepare_directions(cell, entry, params_fw, params_bw, inputs, sequence_length, initial_state_fw,
                                initial_state_bw, time_major, hyper)
    out_fw, states_fw, back_fw = vjp_call(cell, entry, fw, bool(recompute))
    out_bw, states_bw, back_bw = vjp_call(cell, entry, bw, bool(recompute))
    result_fw = arrays.finish(cell, out_fw, states_fw, time_major, fw)
    result_bw = arrays.finish(cell, arrays.reverse_sequence(out_bw, bw.lengths), states_bw, time_major, bw)
    once = _Once("bidirectional_dynamic_rnn_vjp")

    host = arrays.to_host
    lengths = host(bw.lengths)
    dtype = np.dtype(out_fw.dtype)

    def backward(d_outputs, d_states=(None, None)) -> BidirectionalGradients:
        d_out_fw, d_out_bw = _pair(d_outputs, "d_outputs")
        d_state_fw, d_state_bw = _pair((None, None) if d_states is None else d_states, "d_states")
        d_fw = _time_major(host(d_out_fw), "d_outputs[0]", tuple(out_fw.shape), time_major, dtype)
        d_bw = reverse_sequence(_time_major(host(d_out_bw), "d_outputs[1]", tuple(out_bw.shape), time_major, dtype),
                                lengths)
        ds_fw = _state_adjoints(cell, d_state_fw, states_fw, "d_states[0]", host)
        ds_bw = _state_adjoints(cell, d_state_bw, states_bw, "d_states[1]", host)
        once.check()
        grads_fw, d_xs_fw, init_fw = back_fw(d_fw, ds_fw)
        grads_bw, d_xs_bw, init_bw = back_bw(d_bw, ds_bw)
        d_xs = d_xs_fw + reverse_sequence(d_xs_bw, lengths)
        g_fw = _gradients(entry, fw, grads_fw, params_fw, d_xs, time_major, init_fw, cell)
        g_bw = _gradients(entry, bw, grads_bw, params_bw, d_xs, time_major, init_bw, cell)
        return BidirectionalGradients(g_fw.params, g_bw.params, g_fw.inputs, g_fw.initial_state, g_bw.initial_state)

    return ((result_fw[0], result_bw[0]), (result_fw[1], result_bw[1])), backward


def _pair(value, name: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (forward, backward), got {type(value).__name__}")
    return value[0], value[1]


def _gradients(entry: BackendRun, call: Call, grads: dict[str, np.ndarray], params, d_xs: np.ndarray,
               time_major: bool, d_init: list[np.ndarray], cell: CellInfo) -> Gradients:
    """The user's adjoints where the call's arrays live (device arrays for a device call's inputs
    and states; parameters are host arrays, as the call's were checked), in the call's layout."""
    inputs = entry.arrays.adjoint(call, _like_inputs(d_xs, time_major))
    return Gradients(_like_params(grads, params), inputs,
                     cell.state_class(*(entry.arrays.adjoint(call, d) for d in d_init)))


def _like_params(grads: dict[str, np.ndarray], params) -> dict[str, np.ndarray]:
    """The adjoints under the caller's parameter names, in the caller's order."""
    return {name: grads[name] for name in params}


def _like_inputs(d_xs: np.ndarray, time_major: bool) -> np.ndarray:
    return d_xs if time_major else np.ascontiguousarray(d_xs.transpose(1, 0, 2))


Backward = Callable[..., Gradients]
