"""TF 1.x MultiRNNCell inside dynamic_rnn: layers of any generated cells, stacked."""

from __future__ import annotations

from collections.abc import Sequence



def multi_rnn(layers: Sequence, inputs, *, sequence_length=None, initial_states=None, time_major=False,
              backend="cpu"):
    """Run ``layers`` (``(module, params)`` or ``(module, params, hyper)``) bottom to top.

    Equivalent to ``tf.nn.dynamic_rnn(MultiRNNCell(cells), ...)``: each layer sees the
    previous layer's outputs, past each sequence's length outputs are zero and every
    layer's state is copied through. Returns (outputs of the top layer, tuple of states).
    """
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
        raise ValueError("layers must be a non-empty list of (module, params) or (module, params, hyper)")
    if initial_states is not None and len(initial_states) != len(layers):
        raise ValueError(f"initial_states must have one entry per layer ({len(layers)}), got {len(initial_states)}")
    outputs = inputs
    states = []
    for k, layer in enumerate(layers):
        if not isinstance(layer, tuple | list) or len(layer) not in (2, 3):
            raise ValueError(f"layers[{k}] must be (module, params) or (module, params, hyper), got {layer!r:.80}")
        module, params = layer[0], layer[1]
        hyper = dict(layer[2]) if len(layer) == 3 else {}
        if not hasattr(module, "dynamic_rnn"):
            raise ValueError(f"layers[{k}][0] must be a generated cell module, got {module!r:.80}")
        init = None if initial_states is None else initial_states[k]
        outputs, state = module.dynamic_rnn(params, outputs, sequence_length=sequence_length, initial_state=init,
                                            time_major=time_major, backend=backend, **hyper)
        states.append(state)
    return outputs, tuple(states)
