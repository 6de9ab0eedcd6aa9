"""Central finite differences of a random linear loss of dynamic_rnn's outputs and final states.

The loss is ``sum(outputs * R) + sum_s sum(state_s * R_s)`` with fixed random ``R``: its gradient
is what ``backward(R, State(R_s...))`` returns, so every adjoint a backward computes is compared,
entry by entry, with ``(L(v + eps) - L(v - eps)) / (2 eps)`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EPS = 1e-6


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over max |want| (an all-zero ``want`` compares absolutely)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def numeric_gradient(loss: Callable[[], float], value: np.ndarray, eps: float = EPS) -> np.ndarray:
    """d loss / d value by central differences, changing ``value`` in place (restored after)."""
    grad = np.zeros_like(value, dtype=np.float64)
    flat, out = value.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        keep = flat[k]
        flat[k] = keep + eps
        up = loss()
        flat[k] = keep - eps
        down = loss()
        flat[k] = keep
        out[k] = (up - down) / (2 * eps)
    return grad


def linear_loss(outputs, states, r_out: np.ndarray, r_states: list[np.ndarray]) -> float:
    total = float(np.sum(np.asarray(outputs, dtype=np.float64) * r_out))
    for s, r in zip(states, r_states, strict=True):
        total += float(np.sum(np.asarray(s, dtype=np.float64) * r))
    return total
