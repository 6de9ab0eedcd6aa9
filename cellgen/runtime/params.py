"""Runtime helpers shared by generated modules: sizes and parameters."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def take_sizes(sizes: Mapping[str, int], names: tuple[str, ...], known: tuple[str, ...] = ()) -> tuple[int, ...]:
    """The keyword sizes a function needs (``num_proj=...``), each a non-negative int.

    ``input_size`` and the cell's other sizes (``known``) may be given where they are not
    needed; any other size name is an error.
    """
    unknown = sorted(set(sizes) - set(names) - set(known) - {"input_size"})
    if unknown:
        expected = ", ".join(names) if names else "no extra sizes"
        raise ValueError(f"unknown size argument(s) {', '.join(unknown)}; this cell takes {expected}")
    values = []
    for name in names:
        if name not in sizes or sizes[name] is None:
            raise ValueError(f"size {name!r} is required (pass {name}=<int>)")
        value = sizes[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"size {name!r} must be a non-negative int, got {value!r}")
        values.append(int(value))
    return tuple(values)


def size_from(params: Mapping[str, np.ndarray], name: str, dim: int, solve, sizes: Mapping[str, int]) -> int:
    """Read a size off dimension ``dim`` of parameter ``name`` (``solve`` maps the dim to the size)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of parameter arrays, got {type(params).__name__}")
    if name not in params:
        raise ValueError(f"missing parameter {name!r} (params given: {', '.join(sorted(params)) or 'none'})")
    shape = np.shape(params[name])
    if len(shape) <= dim:
        raise ValueError(f"parameter {name!r} has shape {shape}, expected rank {dim + 1} or more")
    value = solve(shape[dim])
    return int(value)


def check_params(params: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                 dtype: np.dtype, sizes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Every expected name present with its exact shape and ``dtype``; no unknown names.

    ``sizes`` (input_size from the inputs, the rest read off the parameters) is quoted in
    shape errors: a wrong ``input_size`` otherwise shows up as a puzzling expected shape.
    """
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; expected "
                         f"{', '.join(map(repr, expected))}")
    context = ""
    if sizes:
        given = [f"{k}={v} (from the inputs)" if k == "input_size" else f"{k}={v}" for k, v in sizes.items()]
        context = " for " + ", ".join(given)
    checked = {}
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"missing parameter {name!r} with shape {tuple(shape)}{context}")
        value = params[name]
        if not hasattr(value, "shape"):
            raise ValueError(f"parameter {name!r} is a {type(value).__name__}, expected an array of shape "
                             f"{tuple(shape)}{context}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}{context}")
        arr = np.asarray(value)
        if arr.dtype != dtype:
            raise ValueError(f"parameter {name!r} has dtype {arr.dtype}, expected {dtype} (the inputs' dtype)")
        checked[name] = arr
    return checked


def init_params(shapes: Mapping[str, tuple[int, ...]], inits: Mapping[str, float | str], dtype, seed) -> dict:
    """Glorot-uniform kernels, ``uniform(+-sqrt(3/n))`` per-unit vectors, constants as given."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        init = inits[name]
        if init == "glorot_uniform":
            limit = np.sqrt(6.0 / max(1, shape[0] + shape[-1]))
            params[name] = rng.uniform(-limit, limit, size=shape).astype(dtype)
        elif init == "uniform":
            limit = np.sqrt(3.0 / max(1, shape[0]))
            params[name] = rng.uniform(-limit, limit, size=shape).astype(dtype)
        else:
            params[name] = np.full(shape, float(init), dtype=dtype)
    return params


def as_rows(value, like: np.ndarray) -> np.ndarray:
    """An operand of a linear as [batch, size] rows: a per-unit parameter (or an expression of
    parameters only, [size]) is the same for every row of ``like`` [batch, ...]."""
    value = np.asarray(value)
    return value if value.ndim == 2 else np.broadcast_to(value, (like.shape[0], value.shape[-1]))
