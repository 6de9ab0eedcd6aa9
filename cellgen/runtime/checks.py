"""Runtime argument checks: each error names the argument and the shape it expected."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Storage-only dtypes (float32 arithmetic), by name: the cuda backend's forward alone takes them.
HALF_DTYPES = ("float16", "bfloat16")
#: What an error about a half array adds: where such arrays run.
HALF_HINT = "float16/bfloat16 run on backend='cuda'"


def dtype_error(what: str, dtype) -> str:
    """``what must be float32 or float64, got <dtype>`` (and where half dtypes run, for one of those)."""
    name = np.dtype(dtype).name
    hint = f"; {HALF_HINT}" if name in HALF_DTYPES else ""
    return f"{what} must be float32 or float64, got {name}{hint}"


def half_name(inputs) -> str | None:
    """``float16`` / ``bfloat16`` for half inputs (host arrays, device float16 arrays, marked device bfloat16
    ones), else None."""
    if type(inputs).__name__ == "DeviceBfloat16":
        return "bfloat16"
    dtype = getattr(inputs, "dtype", None)
    name = None if dtype is None else np.dtype(dtype).name
    return name if name in HALF_DTYPES else None


def reject_half(inputs, what: str) -> None:
    """A ValueError for float16 / bfloat16 ``inputs`` where only float32 and float64 compute (``what``: the
    function, e.g. ``dynamic_rnn_vjp``)."""
    name = half_name(inputs)
    if name is not None:
        raise ValueError(f"{what}: inputs must be float32 or float64, got {name} ({HALF_HINT})")


def as_time_major(inputs, time_major: bool) -> np.ndarray:
    """inputs [B, T, I] (or [T, B, I] when time_major) -> a [T, B, I] float array.

    Batch-major inputs come back as a transposed VIEW (no copy: the CPU kernels read
    rows at any stride); only a last axis that is not contiguous is copied.
    """
    arr = np.asarray(inputs)
    layout = "[max_time, batch_size, input_size]" if time_major else "[batch_size, max_time, input_size]"
    if arr.ndim != 3:
        raise ValueError(f"inputs must have rank 3 {layout}, got shape {arr.shape}")
    if arr.dtype not in FLOAT_DTYPES:
        raise ValueError(dtype_error("inputs", arr.dtype))
    if arr.shape[2] > 1 and arr.strides[2] != arr.itemsize:
        arr = np.ascontiguousarray(arr)
    return arr if time_major else arr.transpose(1, 0, 2)


def sequence_lengths(sequence_length, batch_size: int, max_time: int) -> np.ndarray:
    """None -> all max_time; otherwise ints in [0, max_time], shape [batch_size]."""
    if sequence_length is None:
        return np.full(batch_size, max_time, dtype=np.int64)
    arr = np.asarray(sequence_length)
    if arr.shape != (batch_size,):
        raise ValueError(f"sequence_length must have shape [batch_size] = ({batch_size},), got {arr.shape}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(arr == np.round(arr))))
    if arr.size and not integral:
        raise ValueError(f"sequence_length must hold integers, got dtype {arr.dtype}")
    lengths = arr.astype(np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > max_time):
        raise ValueError(f"sequence_length values must lie in [0, max_time={max_time}], got "
                         f"min {lengths.min()}, max {lengths.max()}")
    return np.ascontiguousarray(lengths)


def initial_states(initial_state, names: Sequence[str], sizes: Sequence[int], batch_size: int,
                   dtype: np.dtype, argument: str = "initial_state") -> list[np.ndarray]:
    """None -> zeros; otherwise one [batch_size, size] array per state, in STATE order."""
    if initial_state is None:
        return [np.zeros((batch_size, n), dtype=dtype) for n in sizes]
    if isinstance(initial_state, np.ndarray) or not isinstance(initial_state, Sequence):
        if len(names) == 1 and hasattr(initial_state, "shape"):
            initial_state = (initial_state,)
        else:
            raise ValueError(f"{argument} must be a tuple of {len(names)} arrays ({', '.join(names)})")
    if len(initial_state) != len(names):
        raise ValueError(f"{argument} must have {len(names)} states ({', '.join(names)}), got {len(initial_state)}")
    states = []
    for name, size, value in zip(names, sizes, initial_state, strict=True):
        arr = np.asarray(value)
        if arr.shape != (batch_size, size):
            raise ValueError(f"{argument}.{name} must have shape [batch_size, {name}_size] = "
                             f"({batch_size}, {size}), got {arr.shape}")
        if arr.dtype not in FLOAT_DTYPES:
            raise ValueError(dtype_error(f"{argument}.{name}", arr.dtype))
        states.append(np.array(arr, dtype=dtype, order="C"))
    return states


def hyper_values(hyper: dict, defaults: dict[str, float], dtype: np.dtype) -> dict[str, np.floating]:
    """Defaults overridden by the call's keywords, as scalars of the inputs' dtype."""
    unknown = sorted(set(hyper) - set(defaults))
    if unknown:
        known = ", ".join(defaults) if defaults else "none"
        raise ValueError(f"unknown keyword argument(s) {', '.join(unknown)}; hyperparameters of this cell: {known}")
    values = {}
    for name, default in defaults.items():
        value = hyper.get(name, default)
        if value is None and default == np.inf:
            value = np.inf  # TF's clip=None: no clipping
        try:
            values[name] = dtype.type(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameter {name} must be a number, got {value!r}") from None
    return values
