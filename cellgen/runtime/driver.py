"""Runtime driver shared by generated modules: TF 1.x dynamic_rnn semantics around the kernels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellgen.runtime import checks
from cellgen.runtime.params import check_params


@dataclass(frozen=True)
class CellInfo:
    """What a generated module tells the driver about its cell."""

    name: str
    state: tuple[str, ...]
    state_class: type
    sizes: tuple[str, ...]
    hyper: dict[str, float]
    delay_states: tuple[str, ...]
    input_state: tuple[bool, ...]
    param_shapes: Callable
    state_size: Callable
    output_size: Callable
    infer_sizes: Callable
    input_width: Callable
    input_size_expr: str
    pack: Callable
    backends: dict[str, BackendRun] = field(default_factory=dict)  # backend name -> its entry


@dataclass
class Call:
    """One checked call: time-major inputs, lengths, states, params, hypers and sizes."""

    xs: np.ndarray
    lengths: np.ndarray
    states: list[np.ndarray]
    params: dict[str, np.ndarray]
    hyper: dict[str, np.floating]
    sizes: dict[str, int]


def prepare(cell: CellInfo, params, inputs, sequence_length, initial_state, time_major: bool, hyper: dict,
            argument: str = "initial_state") -> Call:
    """Check every argument against the cell; raise ValueError naming the bad one."""
    xs = checks.as_time_major(inputs, time_major)
    max_time, batch, input_size = xs.shape
    sizes = cell.infer_sizes(params, input_size)
    extra = {k: v for k, v in sizes.items() if k not in ("input_size", "num_units")}
    checked = check_params(params, cell.param_shapes(input_size, sizes["num_units"], **extra), xs.dtype, sizes)
    width = cell.input_width(sizes)
    if input_size != width:  # a size relation of the spec: cell.input(size=num_units), ...
        known = ", ".join(f"{k}={v}" for k, v in sizes.items() if k != "input_size")
        raise ValueError(f"inputs must have last dimension {cell.input_size_expr} = {width} (the spec's "
                         f"cell.input(size={cell.input_size_expr}); sizes from the parameters: {known}), "
                         f"got {input_size}")
    lengths = checks.sequence_lengths(sequence_length, batch, max_time)
    state_sizes = cell.state_size(sizes["num_units"], input_size=input_size, **extra)
    states = checks.initial_states(initial_state, cell.state, state_sizes, batch, xs.dtype, argument)
    return Call(xs, lengths, states, checked, checks.hyper_values(hyper, cell.hyper, xs.dtype), sizes)


class HostArrays:
    """Where the cpu and reference backends' arrays live: NumPy, on the host.

    A backend whose arrays live elsewhere (cuda: :class:`cellgen.backends.cuda.runtime.DeviceArrays`)
    gives the driver an object with these methods; the driver itself never names a backend.
    """

    def prepare(self, cell: CellInfo, params, inputs, sequence_length, initial_state, time_major: bool,
                hyper: dict, argument: str = "initial_state") -> Call:
        return prepare(cell, params, inputs, sequence_length, initial_state, time_major, hyper, argument)

    def reverse_sequence(self, x, lengths):
        return reverse_sequence(x, lengths)

    def last_input(self, call: Call, k: int) -> np.ndarray:
        """A delay state's final value: the input at each sequence's last valid step."""
        final = call.states[k].copy()
        rows = np.nonzero(call.lengths > 0)[0]
        final[rows] = call.xs[call.lengths[rows] - 1, rows]
        return final

    def finish(self, cell: CellInfo, out, states: list, time_major: bool, call: Call):
        """The user's results: outputs batch-major unless ``time_major``, the states as a State."""
        if not time_major:
            out = np.ascontiguousarray(out.transpose(1, 0, 2))
        return out, cell.state_class(*states)

    def to_host(self, a) -> np.ndarray:
        """An array of the call (or a user's adjoint) as a NumPy array (training's host-side work)."""
        return np.asarray(a)

    def adjoint(self, call: Call, a: np.ndarray):
        """A gradient, where the call's arrays live (the host)."""
        return a

    def release(self, call: Call, out, states: list) -> None:
        """After a plain forward's :meth:`finish`: buffers the call no longer needs (none on the host)."""


HOST = HostArrays()


@dataclass(frozen=True)
class BackendRun:
    """What a generated module registers for one backend (``_backend_<name>``, templates/<name>/).

    ``run(packed, params, xs, lengths, states, hyper, sizes)`` runs the whole time loop on the
    call's arrays (time-major ``xs``, ``cell.pack``'s fused weights when ``packs``) and returns the
    time-major outputs [T, B, out] and the final values of the recurrent (non-delay) states in
    STATE order; ``arrays`` is where its arrays live (:class:`HostArrays` or a device's).
    ``vjp`` (same arguments and ``recompute``) is the backend's training entry, described in
    :mod:`cellgen.runtime.train`; None where the backend has no backward.
    """

    run: Callable
    arrays: Any = HOST
    packs: bool = True
    vjp: Callable | None = None  # training: the saving forward and its backward (cellgen.runtime.train)


def backend_run(cell: CellInfo, backend: str) -> BackendRun:
    """The module's entry for ``backend``; ValueError naming the module's backends otherwise."""
    if not isinstance(backend, str) or backend not in cell.backends:
        raise ValueError(f"backend must be one of {', '.join(cell.backends)}, got {backend!r}")
    return cell.backends[backend]


def run(cell: CellInfo, call: Call, entry: BackendRun) -> tuple[Any, list[Any]]:
    """Time-major outputs [T, B, out] and the final states, in STATE order."""
    packed = cell.pack(call.params, call.sizes) if entry.packs else None
    out, finals = entry.run(packed, call.params, call.xs, call.lengths, call.states, call.hyper, call.sizes)
    finals = iter(finals)
    states = [entry.arrays.last_input(call, k) if is_delay else next(finals)
              for k, is_delay in enumerate(cell.input_state)]
    return out, states


def dynamic_rnn(cell: CellInfo, params, inputs, *, sequence_length=None, initial_state=None, time_major=False,
                backend="cpu", hyper=None):
    """TF 1.x ``dynamic_rnn``: outputs zero past each length, states copied through."""
    entry = backend_run(cell, backend)
    call = entry.arrays.prepare(cell, params, inputs, sequence_length, initial_state, time_major, hyper or {})
    out, states = run(cell, call, entry)
    result = entry.arrays.finish(cell, out, states, time_major, call)
    entry.arrays.release(call, out, states)
    return result


def cell_step(cell: CellInfo, params, inputs, state, hyper):
    """One step of the cell on [B, input_size] inputs (the compiled CPU kernel with T = 1)."""
    x = np.asarray(inputs)
    if x.ndim != 2:
        raise ValueError(f"inputs must have rank 2 [batch_size, input_size], got shape {x.shape}")
    if state is None:
        raise ValueError(f"state must be a tuple of {len(cell.state)} arrays ({', '.join(cell.state)})")
    out, new = dynamic_rnn(cell, params, x[None], initial_state=state, time_major=True, hyper=hyper)
    return out[0], new


def reverse_sequence(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """TF's ``reverse_sequence`` on time-major [T, B, ...]: reverse each row's first lengths[b] steps."""
    out = x.copy()
    for b, n in enumerate(lengths):
        if n > 0:
            out[:n, b] = x[n - 1::-1, b] if n < x.shape[0] else x[::-1, b]
    return out


def prepare_directions(cell: CellInfo, entry, params_fw, params_bw, inputs, sequence_length, initial_state_fw,
                       initial_state_bw, time_major, hyper):
    """A bidirectional call's two prepared calls: the forward direction's, and the backward direction's
    with each sequence reversed in its length (TF's ``reverse_sequence``)."""
    arrays = entry.arrays
    fw = arrays.prepare(cell, params_fw, inputs, sequence_length, initial_state_fw, time_major, hyper,
                        "initial_state_fw")
    bw = arrays.prepare(cell, params_bw, inputs, sequence_length, initial_state_bw, time_major, hyper,
                        "initial_state_bw")
    bw.xs = arrays.reverse_sequence(bw.xs, bw.lengths)
    return fw, bw


def bidirectional_dynamic_rnn(cell: CellInfo, params_fw, params_bw, inputs, *, sequence_length=None,
                              initial_state_fw=None, initial_state_bw=None, time_major=False, backend="cpu",
                              hyper=None):
    """TF 1.x ``bidirectional_dynamic_rnn``: the backward pass sees each sequence reversed in its length."""
    hyper = hyper or {}
    entry = backend_run(cell, backend)
    arrays = entry.arrays
    fw, bw = prepare_directions(cell, entry, params_fw, params_bw, inputs, sequence_length, initial_state_fw,
                                initial_state_bw, time_major, hyper)
    out, states = run(cell, fw, entry)
    out_fw, state_fw = arrays.finish(cell, out, states, time_major, fw)
    arrays.release(fw, out, states)
    out, states_bw = run(cell, bw, entry)
    out_bw, state_bw = arrays.finish(cell, arrays.reverse_sequence(out, bw.lengths), states_bw, time_major, bw)
    arrays.release(bw, out, states_bw)
    return (out_fw, out_bw), (state_fw, state_bw)
