"""Runtime driver shared by generated modules: TF 1.x dynamic_rnn semantics around the kernels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    reference_step: Callable
    pack: Callable
    backends: dict[str, Callable] = field(default_factory=dict)


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


def run(cell: CellInfo, call: Call, backend: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Time-major outputs [T, B, out] and the final states, in STATE order."""
    if backend == "reference":
        return _run_reference(cell, call)
    if backend not in cell.backends:
        raise ValueError(f"backend must be one of {', '.join(['reference', *cell.backends])}, got {backend!r}")
    packed = cell.pack(call.params, call.sizes)
    out, finals = cell.backends[backend](packed, call.params, call.xs, call.lengths, call.states, call.hyper,
                                        call.sizes)
    finals = iter(finals)
    states = []
    for k, is_delay in enumerate(cell.input_state):
        states.append(_last_input(call, k) if is_delay else np.asarray(next(finals)))
    return out, states


def _last_input(call: Call, k: int) -> np.ndarray:
    """A delay state's final value: the input at each sequence's last valid step."""
    final = call.states[k].copy()
    rows = np.nonzero(call.lengths > 0)[0]
    final[rows] = call.xs[call.lengths[rows] - 1, rows]
    return final


def _run_reference(cell: CellInfo, call: Call) -> tuple[np.ndarray, list[np.ndarray]]:
    max_time, batch, _ = call.xs.shape
    out_size = cell.output_size(call.sizes["num_units"], **_extra(call.sizes))
    outputs = np.zeros((max_time, batch, out_size), dtype=call.xs.dtype)
    states = [s.copy() for s in call.states]
    for t in range(max_time):
        out, new = cell.reference_step(call.params, call.xs[t], cell.state_class(*states), call.hyper)
        active = (t < call.lengths)[:, None]
        outputs[t] = np.where(active, out, 0)
        states = [np.where(active, n, s).astype(call.xs.dtype) for n, s in zip(new, states, strict=True)]
    return outputs, states


def _extra(sizes: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in sizes.items() if k not in ("num_units",)}


def dynamic_rnn(cell: CellInfo, params, inputs, *, sequence_length=None, initial_state=None, time_major=False,
                backend="cpu", hyper=None):
    """TF 1.x ``dynamic_rnn``: outputs zero past each length, states copied through."""
    if backend == "cuda":  # device arrays in and out: cellgen.runtime.cuda
        from cellgen.runtime import cuda

        return cuda.dynamic_rnn(cell, params, inputs, sequence_length=sequence_length, initial_state=initial_state,
                                time_major=time_major, hyper=hyper)
    call = prepare(cell, params, inputs, sequence_length, initial_state, time_major, hyper or {})
    out, states = run(cell, call, backend)
    if not time_major:
        out = np.ascontiguousarray(out.transpose(1, 0, 2))
    return out, cell.state_class(*states)


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


def bidirectional_dynamic_rnn(cell: CellInfo, params_fw, params_bw, inputs, *, sequence_length=None,
                              initial_state_fw=None, initial_state_bw=None, time_major=False, backend="cpu",
                              hyper=None):
    """TF 1.x ``bidirectional_dynamic_rnn``: the backward pass sees each sequence reversed in its length."""
    hyper = hyper or {}
    if backend == "cuda":  # device arrays in and out: cellgen.runtime.cuda
        from cellgen.runtime import cuda

        return cuda.bidirectional_dynamic_rnn(cell, params_fw, params_bw, inputs, sequence_length=sequence_length,
                                              initial_state_fw=initial_state_fw, initial_state_bw=initial_state_bw,
                                              time_major=time_major, hyper=hyper)
    fw = prepare(cell, params_fw, inputs, sequence_length, initial_state_fw, time_major, hyper, "initial_state_fw")
    bw = prepare(cell, params_bw, inputs, sequence_length, initial_state_bw, time_major, hyper, "initial_state_bw")
    bw.xs = reverse_sequence(bw.xs, bw.lengths)
    out_fw, state_fw = run(cell, fw, backend)
    out_bw, state_bw = run(cell, bw, backend)
    out_bw = reverse_sequence(out_bw, bw.lengths)
    if not time_major:
        out_fw = np.ascontiguousarray(out_fw.transpose(1, 0, 2))
        out_bw = np.ascontiguousarray(out_bw.transpose(1, 0, 2))
    return (out_fw, out_bw), (cell.state_class(*state_fw), cell.state_class(*state_bw))
