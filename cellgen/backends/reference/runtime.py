"""The reference backend's runtime: the time loop around a module's ``_reference_step``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def run(step: Callable, state_class: type, params, xs: np.ndarray, lengths: np.ndarray, states: list[np.ndarray],
        hyper, out_size: int, recurrent: Sequence[bool]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every step of the unfused cell on time-major ``xs``: outputs zero and states carried through
    past each row's length. Returns the outputs [T, B, out] and the recurrent states' final values."""
    max_time, batch, _ = xs.shape
    outputs = np.zeros((max_time, batch, out_size), dtype=xs.dtype)
    states = [s.copy() for s in states]
    for t in range(max_time):
        out, new = step(params, xs[t], state_class(*states), hyper)
        active = (t < lengths)[:, None]
        outputs[t] = np.where(active, out, 0)
        states = [np.where(active, n, s).astype(xs.dtype) for n, s in zip(new, states, strict=True)]
    return outputs, [s for s, keep in zip(states, recurrent, strict=True) if keep]


class Rows:
    """Whole-batch shapes for the backward step: a value of the equations (a scalar, a per-unit
    vector or [batch, size] rows) broadcast to [batch, size] rows of the batch's dtype."""

    def __init__(self, like: np.ndarray) -> None:
        self.batch, self.dtype = like.shape[0], like.dtype

    def zeros(self, size: int) -> np.ndarray:
        return np.zeros((self.batch, size), dtype=self.dtype)

    def of(self, value, size: int | None = None) -> np.ndarray:
        """``value`` as [batch, size] rows (``size`` None: the value's own last dimension)."""
        value = np.asarray(value, dtype=self.dtype)
        return np.broadcast_to(value, (self.batch, value.shape[-1] if size is None else size))


def vjp(step: Callable, backward_step: Callable, linears: Sequence[tuple[str, str | None]], state_class: type,
        params, xs: np.ndarray, lengths: np.ndarray, states: list[np.ndarray], hyper, out_size: int,
        recurrent: Sequence[bool]):
    """The forward of :func:`run` saving every step's states and linear results, and its backward.

    Returns the outputs [T, B, out], the recurrent states' final values and ``backward(d_out,
    d_finals)``: ``d_out`` [T, B, out] time-major, ``d_finals`` the recurrent states' adjoints.
    ``linears``: each live linear's (kernel, bias), in the order the step appends their results.
    ``backward`` returns the parameters' adjoints, the inputs' [T, B, in] and the initial
    states' (every state, STATE order; a delay state's is the part its x_{-1} received).
    """
    max_time, batch, _ = xs.shape
    outputs = np.zeros((max_time, batch, out_size), dtype=xs.dtype)
    states = [s.copy() for s in states]
    tape = []
    for t in range(max_time):
        ys: list[np.ndarray] = []
        out, new = step(params, xs[t], state_class(*states), hyper, ys)
        tape.append((states, ys))
        active = (t < lengths)[:, None]
        outputs[t] = np.where(active, out, 0)
        states = [np.where(active, n, s).astype(xs.dtype) for n, s in zip(new, states, strict=True)]
    finals = [s for s, keep in zip(states, recurrent, strict=True) if keep]

    def backward(d_out: np.ndarray, d_finals: list[np.ndarray]):
        dtype = xs.dtype
        grads = {name: np.zeros_like(value) for name, value in params.items()}
        d_xs = np.zeros_like(xs)
        d_x0 = np.zeros((batch, xs.shape[2]), dtype=dtype)
        d_new = [d.astype(dtype, copy=True) for d in d_finals]
        for t in range(max_time - 1, -1, -1):
            active = (t < lengths)[:, None]
            saved, ys = tape[t]
            masked_new = [np.where(active, d, 0).astype(dtype) for d in d_new]
            d_gates, operands, d_state, d_x, d_x_prev, d_params = backward_step(
                params, xs[t], state_class(*saved), ys, np.where(active, d_out[t], 0).astype(dtype), masked_new,
                hyper)
            for (kernel, bias), dg, ops in zip(linears, d_gates, operands, strict=True):
                dg = np.where(active, dg, 0)
                r = 0
                for op in ops:
                    grads[kernel][r:r + op.shape[1]] += (op.T @ dg).astype(dtype)
                    r += op.shape[1]
                if bias is not None:
                    grads[bias] += dg.sum(axis=0).astype(dtype)
            for name, value in d_params.items():
                grads[name] += value.astype(dtype)
            d_new = [np.where(active, ds, dn).astype(dtype) for ds, dn in zip(d_state, d_new, strict=True)]
            d_xs[t] += np.where(active, d_x, 0).astype(dtype)
            prev = np.where(active, d_x_prev, 0).astype(dtype)
            if t > 0:
                d_xs[t - 1] += prev
            else:
                d_x0 += prev
        d_new = iter(d_new)
        d_states = [next(d_new) if keep else d_x0 for keep in recurrent]
        return grads, d_xs, d_states

    return outputs, finals, backward
