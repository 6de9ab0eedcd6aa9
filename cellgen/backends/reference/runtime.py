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
