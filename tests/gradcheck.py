"""Central finite differences of a random linear loss of dynamic_rnn's outputs and final states.

The loss is ``sum(outputs * R) + sum_s sum(state_s * R_s)`` with fixed random ``R``: its gradient
is what ``backward(R, State(R_s...))`` returns, so every adjoint a backward computes is compared,
entry by entry, with ``(L(v + eps) - L(v - eps)) / (2 eps)`` in float64.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-6
T, INPUT, H = 5, 3, 4
SIZES = {"lstm": {"num_proj": 3}}
#: hyperparameters that make every piece of the lstm's equations matter (both clips active)
HYPER = {"lstm": {"cell_clip": 0.8, "proj_clip": 0.3}}


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


@dataclass
class Case:
    mod: Any
    params: dict[str, np.ndarray]
    inputs: np.ndarray
    lengths: np.ndarray
    initial: Any
    hyper: dict[str, float]
    time_major: bool


def make_case(name: str, *, time_major: bool = False, dtype=np.float64, seed: int = 0, input_size: int = INPUT,
              lengths=(0, T, 2, 3), units: int = H, sizes: dict[str, int] | None = None, mod=None) -> Case:
    mod = importlib.import_module(f"generated.{name}") if mod is None else mod
    rng = np.random.default_rng(seed)
    sizes = SIZES.get(name, {}) if sizes is None else sizes
    params = mod.init_params(input_size, units, dtype=np.float64, seed=seed, **sizes)
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}
    steps = max(lengths)
    shape = (steps, len(lengths), input_size) if time_major else (len(lengths), steps, input_size)
    inputs = rng.standard_normal(shape).astype(dtype)
    initial = mod.State(*(rng.standard_normal((len(lengths), n)).astype(dtype)
                          for n in mod.state_size(units, input_size=input_size, **sizes)))
    return Case(mod, params, inputs, np.array(lengths), initial, dict(HYPER.get(name, {})), time_major)


def run(case: Case, backend: str, **kw):
    return case.mod.dynamic_rnn(case.params, case.inputs, sequence_length=case.lengths,
                                initial_state=case.initial, time_major=case.time_major, backend=backend,
                                **case.hyper, **kw)


def vjp(case: Case, backend: str, **kw):
    return case.mod.dynamic_rnn_vjp(case.params, case.inputs, sequence_length=case.lengths,
                                    initial_state=case.initial, time_major=case.time_major, backend=backend,
                                    **case.hyper, **kw)


def weights(out, states, seed: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(np.shape(out)), [rng.standard_normal(np.shape(s)) for s in states]


def directional_error(loss: Callable[[], float], value: np.ndarray, grad: np.ndarray,
                      rng: np.random.Generator) -> float:
    """|<grad, V> - central difference along V| / (|grad| |V|) for a random direction V."""
    v = rng.standard_normal(value.shape)
    keep = value.copy()
    value += EPS * v
    up = loss()
    value[...] = keep - EPS * v
    down = loss()
    value[...] = keep
    fd = (up - down) / (2 * EPS)
    scale = float(np.linalg.norm(grad) * np.linalg.norm(v))
    return abs(float(np.sum(grad * v)) - fd) / max(scale, 1e-9)
