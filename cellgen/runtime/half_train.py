"""Training with float16 / bfloat16 storage: ``dynamic_rnn_vjp`` and ``bidirectional_dynamic_rnn_vjp`` on
half host arrays (``backend="cuda"``).

A half forward computes in float32 on values of the storage dtype, with float32 working copies of the
states, and rounds only what it hands back (docs/gpu.md, "Half precision"). So its training is the
float32 training on those values, widened (exact): the saved activations, the backward's kernels and its
gradient GEMMs are float32; the outputs and final states are rounded to the storage dtype
(``dynamic_rnn``'s values but for the hoisted GEMM's summation order: the half forward's runs on tensor
cores), the incoming adjoints are widened, and every gradient is rounded to the storage dtype once, at the
end. The weights live on the device in float32 while training (the float32 training kernels), not in half.

Host arrays only (a device half array is a ValueError): the gradients are computed into host memory, as
in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cellgen.runtime.checks import HALF_HINT

F32 = np.dtype(np.float32)


def _is_device(a: Any) -> bool:
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "DeviceBfloat16" or (
        hasattr(a, "copy_to_host") and not isinstance(a, np.ndarray))


def _check_host(what: str, name: str, value: Any) -> None:
    if value is not None and _is_device(value):
        raise ValueError(f"{what}: {name} is a device array; half-precision training takes host arrays "
                         f"(float16 / ml_dtypes.bfloat16), the gradients are computed on the host")


def _widen(value: Any, storage: np.dtype) -> Any:
    """A host array as float32 values of ``storage`` (rounded to it first: exact for storage arrays)."""
    return None if value is None else np.asarray(value).astype(storage).astype(F32)


def _states(value: Any, storage: np.dtype) -> Any:
    """An initial state or a state adjoint (one array, a sequence of arrays or Nones, or None), widened."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, np.ndarray):
        return type(value)(_widen(v, storage) for v in value) if isinstance(value, tuple) else \
            [_widen(v, storage) for v in value]
    return _widen(value, storage)


def _rounded(value: Any, storage: np.dtype) -> Any:
    """Float32 results (an array, a State, a tuple, a dict) rounded to ``storage``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _rounded(v, storage) for k, v in value.items()}
    if isinstance(value, tuple):
        items = [_rounded(v, storage) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return np.asarray(value).astype(storage)


def _params(what: str, params: Any, storage: np.dtype) -> Any:
    if not isinstance(params, Mapping):
        return params  # the float32 checks name what was expected
    for name, value in params.items():
        _check_host(what, f"parameter {name!r}", value)
        dtype = np.asarray(value).dtype
        if dtype != storage:
            raise ValueError(f"parameter {name!r} has dtype {dtype.name}, expected {storage.name} (the inputs' dtype)")
    return {k: _widen(v, storage) for k, v in params.items()}


def _storage(what: str, backend: str, inputs: Any) -> np.dtype:
    _check_host(what, "inputs", inputs)
    storage = np.asarray(inputs).dtype
    if backend != "cuda":
        raise ValueError(f"{what}: inputs must be float32 or float64 on backend={backend!r}, got {storage.name} "
                         f"({HALF_HINT})")
    return storage


def dynamic_rnn_vjp(vjp: Callable, cell_states: Callable, params, inputs, *, backend: str, initial_state=None,
                    **kwargs):
    """``vjp`` (the float32 :func:`cellgen.runtime.train.dynamic_rnn_vjp` of the cell) on the widened
    arguments; its results rounded to the inputs' storage dtype. ``cell_states`` makes a State."""
    what = "dynamic_rnn_vjp"
    storage = _storage(what, backend, inputs)
    _check_host(what, "initial_state", initial_state)
    (out, state), backward32 = vjp(_params(what, params, storage), _widen(inputs, storage), backend=backend,
                                   initial_state=_states(initial_state, storage), **kwargs)

    def backward(d_outputs, d_state=None):
        g = backward32(_widen(d_outputs, storage), _states(d_state, storage))
        return type(g)(_rounded(g.params, storage), _rounded(g.inputs, storage),
                       cell_states(*_rounded(tuple(g.initial_state), storage)))

    return (_rounded(out, storage), cell_states(*_rounded(tuple(state), storage))), backward


def bidirectional_dynamic_rnn_vjp(vjp: Callable, cell_states: Callable, params_fw, params_bw, inputs, *,
                                  backend: str, initial_state_fw=None, initial_state_bw=None, **kwargs):
    """:func:`dynamic_rnn_vjp` for the bidirectional vjp."""
    what = "bidirectional_dynamic_rnn_vjp"
    storage = _storage(what, backend, inputs)
    _check_host(what, "initial_state_fw", initial_state_fw)
    _check_host(what, "initial_state_bw", initial_state_bw)
    ((out_fw, out_bw), (st_fw, st_bw)), backward32 = vjp(
        _params(what, params_fw, storage), _params(what, params_bw, storage), _widen(inputs, storage),
        backend=backend, initial_state_fw=_states(initial_state_fw, storage),
        initial_state_bw=_states(initial_state_bw, storage), **kwargs)

    def backward(d_outputs, d_states=(None, None)):
        d_out = tuple(_widen(d, storage) for d in d_outputs) if isinstance(d_outputs, tuple | list) else d_outputs
        d_st = (None, None) if d_states is None else d_states
        d_st = tuple(_states(d, storage) for d in d_st) if isinstance(d_st, tuple | list) else d_st
        g = backward32(d_out, d_st)
        return type(g)(_rounded(g.params_fw, storage), _rounded(g.params_bw, storage), _rounded(g.inputs, storage),
                       cell_states(*_rounded(tuple(g.initial_state_fw), storage)),
                       cell_states(*_rounded(tuple(g.initial_state_bw), storage)))

    outputs = (_rounded(out_fw, storage), _rounded(out_bw, storage))
    states = (cell_states(*_rounded(tuple(st_fw), storage)), cell_states(*_rounded(tuple(st_bw), storage)))
    return (outputs, states), backward
