"""``recompute=True``: train on long sequences keeping only the states at block starts.

The forward runs the plain kernels block by block (``block`` steps each, ``ceil(sqrt(T))`` by
default) and keeps each block's starting states (the checkpoints). The backward walks the
blocks from the last: it reruns the forward that saves over one block from its checkpoint
(the gates recomputed) and runs the fused backward over that block, carrying the states'
adjoints into the block before. Memory: the checkpoints (T / block steps of states) plus one
block's saved values, instead of every step's; time: one more forward.

A block is an ordinary call on the steps ``t0 .. t1``: each row's length becomes
``clip(length - t0, 0, t1 - t0)`` (rows past their length are frozen the same way), and a delay
state's starting value is the input at ``t0 - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def block_size(steps: int) -> int:
    """Steps per block: ~sqrt(T), which balances the checkpoints against one block's saved values."""
    return max(1, math.ceil(math.sqrt(steps)))


def checkpointed(run: Callable, run_saving: Callable, backward: Callable, packed, params, xs: np.ndarray,
                 lengths: np.ndarray, states: list[np.ndarray], hyper, sizes, recurrent: Sequence[bool],
                 block: int | None = None):
    """The ``vjp`` of a backend (cellgen.runtime.train) from its plain forward ``run``, its forward
    that saves ``run_saving`` and its ``backward`` over the saved values, one block at a time."""
    steps = xs.shape[0]
    size = block or block_size(steps)
    blocks = [(t0, min(steps, t0 + size)) for t0 in range(0, steps, size)]
    checkpoints: list[list[np.ndarray]] = []
    outs = []
    current = list(states)
    for t0, t1 in blocks:
        checkpoints.append(current)
        part = np.clip(lengths - t0, 0, t1 - t0)
        out, finals = run(packed, params, xs[t0:t1], part, current, hyper, sizes)
        outs.append(out)
        finals = iter(finals)
        following = []
        for k, keep in enumerate(recurrent):
            if keep:
                following.append(np.asarray(next(finals)))
            else:  # a delay state: x at the block's last step where the row got there
                value = current[k].copy()
                rows = lengths >= t1
                value[rows] = xs[t1 - 1, rows]
                following.append(value)
        current = following
    out = np.concatenate(outs, axis=0) if outs else np.zeros((0, xs.shape[1], 0), dtype=xs.dtype)
    finals = [s for s, keep in zip(current, recurrent, strict=True) if keep]

    def back(d_out: np.ndarray, d_finals: list[np.ndarray]):
        grads = None
        d_xs = np.zeros(xs.shape, dtype=xs.dtype)
        carried = list(d_finals)
        first = [None] * len(recurrent)
        for (t0, t1), start in zip(reversed(blocks), reversed(checkpoints), strict=True):
            part = np.clip(lengths - t0, 0, t1 - t0)
            _, _, saved = run_saving(packed, params, xs[t0:t1], part, start, hyper, sizes)
            g, d_block, d_start = backward(packed, params, xs[t0:t1], part, start, saved, d_out[t0:t1], carried,
                                           hyper, sizes)
            grads = g if grads is None else {k: grads[k] + v for k, v in g.items()}
            d_xs[t0:t1] += d_block
            carried = [d for d, keep in zip(d_start, recurrent, strict=True) if keep]
            for k, keep in enumerate(recurrent):
                if not keep:
                    if t0 > 0:
                        d_xs[t0 - 1] += d_start[k]
                    else:
                        first[k] = d_start[k]
        carried_iter = iter(carried)
        d_init = [next(carried_iter) if keep else first[k] for k, keep in enumerate(recurrent)]
        return grads, d_xs, d_init

    return out, finals, back
