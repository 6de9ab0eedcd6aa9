"""CUDA runtime the generated modules share: device arrays, weight upload, launch helpers and
TF 1.x ``dynamic_rnn`` / ``bidirectional_dynamic_rnn`` around a module's ``backends["cuda"]``
(the hoisted GEMM is :mod:`cellgen.backends.cuda.gemm`).

Arrays in and out may be NumPy (copied to the device and back) or device arrays: numba
device arrays or anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors),
used without a copy; device inputs give numba device arrays back. Parameters are packed
on the host and uploaded once per call. ``numba.cuda`` is imported on first use only, so a
CPU-only install imports this module; ``NUMBA_ENABLE_CUDASIM=1`` runs everything in numba's
simulator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from cellgen.runtime import driver
from cellgen.runtime.checks import FLOAT_DTYPES

cuda = None  # numba.cuda, bound by numba_cuda() (the hand-written kernels below read it)
#: Threads per block of the hand-written copy kernels, and their largest grid.
COPY_THREADS, COPY_MAX_BLOCKS = 128, 1024


class CudaUnavailable(RuntimeError):
    """backend="cuda" without numba-cuda, or without a GPU outside the simulator."""


def numba_cuda():
    """``numba.cuda``, imported now; CudaUnavailable with what to install or set if it cannot run."""
    global cuda
    if cuda is None:
        try:
            from numba import cuda as module
        except ImportError as err:
            raise CudaUnavailable("backend='cuda' needs numba-cuda: pip install -e .[cuda]") from err
        if not module.is_available():
            raise CudaUnavailable("backend='cuda' found no usable CUDA GPU; set NUMBA_ENABLE_CUDASIM=1 before "
                                  "numba.cuda is imported to run the kernels in numba's simulator")
        cuda = module
    return cuda


def simulated() -> bool:
    """True when numba.cuda is the simulator (NUMBA_ENABLE_CUDASIM=1 at its import)."""
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def jit_kernels(sources: Mapping[str, Any]) -> SimpleNamespace:
    """``cuda.jit`` every plain kernel function; each compiles on its first launch per signature."""
    module = numba_cuda()
    return SimpleNamespace(**{name: module.jit(fn) for name, fn in sources.items()})


def blocks(n: int, size: int) -> int:
    """Blocks of ``size`` covering ``n`` (at least one: kernels guard their bounds)."""
    return max(1, -(-int(n) // size))


def empty(shape: tuple[int, ...], dtype) -> Any:
    """An uninitialised device array."""
    return numba_cuda().device_array(tuple(int(d) for d in shape), dtype=np.dtype(dtype))


def zeros(shape: tuple[int, ...], dtype) -> Any:
    """A zero-filled device array."""
    return numba_cuda().to_device(np.zeros(tuple(int(d) for d in shape), dtype=np.dtype(dtype)))


def copy(a) -> Any:
    """A new device array with a device array's contents (device to device)."""
    out = empty(a.shape, a.dtype)
    out.copy_to_device(a)
    return out


def is_device_array(a) -> bool:
    """A numba device array or anything exporting ``__cuda_array_interface__``."""
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return cuda is not None and cuda.devicearray.is_cuda_ndarray(a)


def as_device(a) -> Any:
    """Device arrays as they are (zero-copy view); host arrays copied to the device (C order)."""
    module = numba_cuda()
    if module.devicearray.is_cuda_ndarray(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return module.as_cuda_array(a)
    return module.to_device(np.ascontiguousarray(a))


def to_host(a) -> np.ndarray:
    """A NumPy copy of a device array; host arrays as they are."""
    if is_device_array(a):
        return as_device(a).copy_to_host()
    return np.asarray(a)


def _host_tree(value):
    if value is None or isinstance(value, np.ndarray) or not isinstance(value, Sequence):
        return to_host(value) if value is not None and is_device_array(value) else value
    return type(value)(*map(to_host, value)) if hasattr(value, "_fields") else [to_host(v) for v in value]


# -- weights ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceWeights:
    """A cell's packed weights on the device; recurrent ones gate-interleaved where the kernel fuses."""

    hoisted: Any
    bias: Any
    recurrent: tuple[Any, ...]
    params: dict[str, Any]


def interleave(weight: np.ndarray, gates: int) -> np.ndarray:
    """Columns ``g * units + u`` -> ``u * gates + g``: the gate columns of each unit adjacent.

    >>> interleave(np.arange(6).reshape(1, 6), 2)
    array([[0, 3, 1, 4, 2, 5]])
    """
    rows, width = weight.shape
    if gates == 1:
        return np.ascontiguousarray(weight)
    return np.ascontiguousarray(weight.reshape(rows, gates, width // gates).transpose(0, 2, 1).reshape(rows, width))


def upload_weights(packed, params: Mapping[str, np.ndarray], gates: Sequence[int],
                   unit_params: Sequence[str]) -> DeviceWeights:
    """Upload ``cell.pack``'s host weights: recurrent GEMM s interleaved by ``gates[s]``."""
    module = numba_cuda()
    w_hoisted, b_hoisted, recurrent = packed
    return DeviceWeights(
        hoisted=None if w_hoisted is None else module.to_device(np.ascontiguousarray(w_hoisted)),
        bias=None if b_hoisted is None else module.to_device(np.ascontiguousarray(b_hoisted)),
        recurrent=tuple(module.to_device(interleave(w, g)) for w, g in zip(recurrent, gates, strict=True)),
        params={name: module.to_device(np.ascontiguousarray(params[name])) for name in unit_params},
    )


# -- hand-written copy kernels (cell-independent) ------------------------------------------------
def _permute_kernel(src, dst, swap):
    """dst[i, j, f] = src[j, i, f] when swap, else src[i, j, f]; a grid-stride loop."""
    n0, n1, n2 = dst.shape
    for e in range(cuda.grid(1), n0 * n1 * n2, cuda.gridsize(1)):
        f = e % n2
        r = e // n2
        j = r % n1
        i = r // n1
        if swap:
            dst[i, j, f] = src[j, i, f]
        else:
            dst[i, j, f] = src[i, j, f]


def _reverse_kernel(src, lengths, dst):
    """TF's reverse_sequence on time-major [T, B, F]: each row's first lengths[b] steps reversed."""
    steps, batch, size = dst.shape
    for e in range(cuda.grid(1), steps * batch * size, cuda.gridsize(1)):
        f = e % size
        r = e // size
        b = r % batch
        t = r // batch
        n = lengths[b]
        if t < n:
            dst[t, b, f] = src[n - 1 - t, b, f]
        else:
            dst[t, b, f] = src[t, b, f]


def _last_input_kernel(xs, lengths, initial, dst):
    """A delay state's final value: xs[lengths[b] - 1, b] (the initial state where lengths[b] == 0)."""
    batch, size = dst.shape
    for e in range(cuda.grid(1), batch * size, cuda.gridsize(1)):
        f = e % size
        b = e // size
        n = lengths[b]
        if n > 0:
            dst[b, f] = xs[n - 1, b, f]
        else:
            dst[b, f] = initial[b, f]


_COPY_KERNELS: dict[str, Any] = {}


def _copy_kernel(name: str):
    if not _COPY_KERNELS:
        _COPY_KERNELS.update(vars(jit_kernels({"permute": _permute_kernel, "reverse": _reverse_kernel,
                                               "last_input": _last_input_kernel})))
    return _COPY_KERNELS[name]


def _launch(name: str, total: int, *args) -> None:
    if total:
        grid = min(blocks(total, COPY_THREADS), COPY_MAX_BLOCKS)
        _copy_kernel(name)[grid, COPY_THREADS](*args)


def swap_time_batch(a) -> Any:
    """[X, Y, F] -> a new C-contiguous [Y, X, F] device array."""
    out = empty((a.shape[1], a.shape[0], a.shape[2]), a.dtype)
    _launch("permute", int(np.prod(out.shape)), a, out, True)
    return out


def to_time_major(inputs, is_time_major: bool) -> Any:
    """Device inputs -> C-contiguous [T, B, I] on the device (zero-copy when already so)."""
    arr = as_device(inputs)
    layout = "[max_time, batch_size, input_size]" if is_time_major else "[batch_size, max_time, input_size]"
    if arr.ndim != 3:
        raise ValueError(f"inputs must have rank 3 {layout}, got shape {tuple(arr.shape)}")
    if np.dtype(arr.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"inputs must be float32 or float64, got {arr.dtype}")
    if not is_time_major:
        return swap_time_batch(arr)
    if _c_contiguous(arr):
        return arr
    out = empty(arr.shape, arr.dtype)
    _launch("permute", int(np.prod(out.shape)), arr, out, False)
    return out


def _c_contiguous(arr) -> bool:
    check = getattr(arr, "is_c_contiguous", None)
    return bool(check()) if check is not None else bool(arr.flags["C_CONTIGUOUS"])


def reverse_sequence(xs, lengths) -> Any:
    """TF's reverse_sequence of a time-major device array by device int64 lengths."""
    out = empty(xs.shape, xs.dtype)
    _launch("reverse", int(np.prod(out.shape)), xs, lengths, out)
    return out


def last_input(xs, lengths, initial) -> Any:
    """A delay state's final value on the device (see :func:`_last_input_kernel`)."""
    out = empty(initial.shape, initial.dtype)
    _launch("last_input", int(np.prod(out.shape)), xs, lengths, initial, out)
    return out


# -- where the arrays live: the driver's interface (cellgen.runtime.driver.HostArrays) -------------
@dataclass
class DeviceCall:
    """One checked call with its arrays on the device; ``on_host``: give NumPy arrays back."""

    xs: Any
    lengths: Any
    states: list[Any]
    params: dict[str, np.ndarray]
    hyper: dict[str, np.floating]
    sizes: dict[str, int]
    on_host: bool


class DeviceArrays:
    """The cuda backend's arrays: numba.cuda device arrays (host NumPy arrays are uploaded).

    The driver (:func:`cellgen.runtime.driver.dynamic_rnn`) runs the same TF semantics on these
    as on the host; only where the arrays live differs.
    """

    def prepare(self, cell: driver.CellInfo, params, inputs, sequence_length, initial_state, time_major: bool,
                hyper: dict, argument: str = "initial_state") -> DeviceCall:
        """Check every argument with the host driver's checks (on host copies of parameters, lengths and
        states; on the shape alone for device inputs), then put the inputs, lengths and states on the device."""
        numba_cuda()
        host_params = {k: to_host(v) for k, v in params.items()} if isinstance(params, Mapping) else params
        lengths = None if sequence_length is None else to_host(sequence_length)
        state = _host_tree(initial_state)
        on_host = not is_device_array(inputs)
        if on_host:
            call = driver.prepare(cell, host_params, inputs, lengths, state, time_major, hyper, argument)
            xs = as_device(call.xs)
        else:
            xs = to_time_major(inputs, time_major)
            shape_only = np.empty(xs.shape, np.dtype(xs.dtype))  # never touched: the checks read its shape
            call = driver.prepare(cell, host_params, shape_only, lengths, state, True, hyper, argument)
        return DeviceCall(xs, as_device(call.lengths), [as_device(s) for s in call.states], call.params,
                          call.hyper, call.sizes, on_host)

    def reverse_sequence(self, xs, lengths) -> Any:
        return reverse_sequence(xs, lengths)

    def last_input(self, call: DeviceCall, k: int) -> Any:
        return last_input(call.xs, call.lengths, call.states[k])

    def finish(self, cell: driver.CellInfo, out, states: list[Any], time_major: bool, call: DeviceCall):
        """Outputs batch-major unless ``time_major``; NumPy arrays back when the inputs were NumPy's."""
        if not time_major:
            out = swap_time_batch(out)
        if call.on_host:
            return out.copy_to_host(), cell.state_class(*(s.copy_to_host() for s in states))
        return out, cell.state_class(*states)

    def to_host(self, a) -> np.ndarray:
        return to_host(a)

    def adjoint(self, call: DeviceCall, a: np.ndarray) -> Any:
        """A gradient (computed into host memory) as the call's arrays: a device array for device inputs."""
        return a if call.on_host else as_device(np.ascontiguousarray(a))


DEVICE = DeviceArrays()
