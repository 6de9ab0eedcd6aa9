"""TF 1.x MultiRNNCell inside dynamic_rnn: layers of any generated cells, stacked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def multi_rnn(layers: Sequence, inputs, *, sequence_length=None, initial_states=None, time_major=False,
              backend="cpu"):
    """Run ``layers`` (``(module, params)`` or ``(module, params, hyper)``) bottom to top.

    Equivalent to ``tf.nn.dynamic_rnn(MultiRNNCell(cells), ...)``: each layer sees the
    previous layer's outputs, past each sequence's length outputs are zero and every
    layer's state is copied through. Returns (outputs of the top layer, tuple of states).
    """
    outputs = inputs
    states = []
    for module, params, hyper, init in _layers(layers, initial_states):
        outputs, state = module.dynamic_rnn(params, outputs, sequence_length=sequence_length, initial_state=init,
                                            time_major=time_major, backend=backend, **hyper)
        states.append(state)
    return outputs, tuple(states)


@dataclass(frozen=True)
class MultiGradients:
    """``multi_rnn_vjp``'s ``backward`` result: one parameter-adjoint dict per layer, the inputs'
    adjoint and one initial-state adjoint (a State) per layer."""

    params: list[dict[str, Any]]
    inputs: Any
    initial_states: tuple[Any, ...]


def multi_rnn_vjp(layers: Sequence, inputs, *, sequence_length=None, initial_states=None, time_major=False,
                  backend="cpu", recompute=False):
    """:func:`multi_rnn` and its backward: ``((outputs, states), backward)``; ``backward(d_outputs,
    d_states=None)`` (``d_states``: one State or None per layer) returns :class:`MultiGradients`.

    The layers' backwards run top to bottom, each feeding its inputs' adjoint to the layer below."""
    outputs = inputs
    states, backwards = [], []
    for module, params, hyper, init in _layers(layers, initial_states):
        if not hasattr(module, "dynamic_rnn_vjp"):
            raise ValueError(f"{module.__name__} has no dynamic_rnn_vjp: rebuild it with this cellgen")
        (outputs, state), backward = module.dynamic_rnn_vjp(
            params, outputs, sequence_length=sequence_length, initial_state=init, time_major=time_major,
            backend=backend, recompute=recompute, **hyper)
        states.append(state)
        backwards.append(backward)

    def backward(d_outputs, d_states=None) -> MultiGradients:
        if d_states is not None and (not isinstance(d_states, Sequence) or len(d_states) != len(backwards)):
            raise ValueError(f"d_states must be None or hold one State (or None) per layer ({len(backwards)})")
        d = d_outputs
        grads = []
        for k in range(len(backwards) - 1, -1, -1):
            g = backwards[k](d, None if d_states is None else d_states[k])
            grads.append(g)
            d = g.inputs
        grads.reverse()
        return MultiGradients([g.params for g in grads], d, tuple(g.initial_state for g in grads))

    return (outputs, tuple(states)), backward


def _layers(layers: Sequence, initial_states):
    """Each layer's (module, params, hyper, initial state), checked."""
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
        raise ValueError("layers must be a non-empty list of (module, params) or (module, params, hyper)")
    if initial_states is not None and len(initial_states) != len(layers):
        raise ValueError(f"initial_states must have one entry per layer ({len(layers)}), got {len(initial_states)}")
    checked = []
    for k, layer in enumerate(layers):
        if not isinstance(layer, tuple | list) or len(layer) not in (2, 3):
            raise ValueError(f"layers[{k}] must be (module, params) or (module, params, hyper), got {layer!r:.80}")
        module, params = layer[0], layer[1]
        hyper = dict(layer[2]) if len(layer) == 3 else {}
        if not hasattr(module, "dynamic_rnn"):
            raise ValueError(f"layers[{k}][0] must be a generated cell module, got {module!r:.80}")
        checked.append((module, params, hyper, None if initial_states is None else initial_states[k]))
    return checked
