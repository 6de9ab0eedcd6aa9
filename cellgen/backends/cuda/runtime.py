"""CUDA runtime the generated modules share: device arrays, weight upload, launch helpers and
TF 1.x ``dynamic_rnn`` / ``bidirectional_dynamic_rnn`` around a module's ``backends["cuda"]``
(the hoisted GEMM is :mod:`cellgen.backends.cuda.gemm`).

Arrays in and out may be NumPy (copied to the device and back) or device arrays: numba
device arrays or anything with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors),
used without a copy; device inputs give numba device arrays back. Device parameters, inputs
and states never go through the host (their checks read shapes and dtypes; a device
``sequence_length``'s B values are read to check their range); host parameters are packed and
uploaded once and reused while unchanged (:mod:`cellgen.backends.cuda.reuse`). ``numba.cuda`` is
imported on first use only, so a CPU-only install imports this module; ``NUMBA_ENABLE_CUDASIM=1``
runs everything in numba's simulator.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from cellgen.backends.cuda import precision
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
    """A numba device array, anything exporting ``__cuda_array_interface__``, or a marked bfloat16 one."""
    if isinstance(a, precision.DeviceBfloat16) or hasattr(a, "__cuda_array_interface__"):
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


def contiguous(a) -> Any:
    """A device array as a C-contiguous numba device array (a device copy only where it is not)."""
    arr = as_device(a)
    if _c_contiguous(arr):
        return arr
    out = empty(arr.shape, arr.dtype)
    copy_into(out, arr)
    return out


def shape_only(a) -> np.ndarray:
    """A host stand-in with a device array's shape and dtype and no data (for the host checks)."""
    arr = as_device(a)
    return np.broadcast_to(np.zeros((), dtype=np.dtype(arr.dtype)), tuple(arr.shape))


def to_host(a) -> np.ndarray:
    """A NumPy copy of a device array; host arrays as they are."""
    if is_device_array(a):
        return as_device(a).copy_to_host()
    return np.asarray(a)


def _is_sequence(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, np.ndarray | str | bytes)


def _state_items(initial_state) -> list[Any] | None:
    """The user's states one by one (a single array for a one-state cell too); None when not a sequence
    of them (None, or a malformed value the host checks reject with their message)."""
    if _is_sequence(initial_state):
        return list(initial_state)
    if initial_state is not None and is_device_array(initial_state):
        return [initial_state]
    if isinstance(initial_state, np.ndarray):
        return [initial_state]
    return None


def _upload(host: np.ndarray) -> Any:
    """A host array in a pooled device buffer."""
    out = POOL.take(host.shape, host.dtype)
    if host.size:
        out.copy_to_device(np.ascontiguousarray(host))
    return out


def device_lengths(given, checked: np.ndarray) -> Any:
    """The checked int64 lengths on the device: the caller's device array itself when it is int64 and contiguous."""
    if given is not None and is_device_array(given):
        arr = as_device(given)
        if np.dtype(arr.dtype) == np.int64 and _c_contiguous(arr) and arr.ndim == 1:
            return arr
    return as_device(checked)


# -- buffers reused across calls -----------------------------------------------------------------
#: Free buffers kept per (shape, dtype).
POOL_PER_KEY = 4


class BufferPool:
    """Free device buffers by (shape, dtype); :meth:`take` reuses one or allocates.

    A call takes its buffers and gives back those whose values are no longer needed: the hoisted
    ``pre``, operand buffers and double-buffer halves once the forward's launches are queued; a
    host call's uploaded inputs, outputs and states once its results were copied back
    (:meth:`DeviceArrays.release`). Everything runs on the default stream, so a buffer given back is
    written again only after the kernels queued before that read it. Never pooled: whatever a
    caller holds (device results, a training call's arrays that its backward reads).
    """

    def __init__(self, per_key: int = POOL_PER_KEY) -> None:
        self.per_key = per_key
        self._free: dict[tuple, list[Any]] = {}
        self._lock = threading.Lock()
        self.allocations = 0

    @staticmethod
    def _key(shape, dtype) -> tuple:
        return tuple(int(d) for d in shape), np.dtype(dtype).str

    def take(self, shape: tuple[int, ...], dtype) -> Any:
        """A device array of ``shape`` and ``dtype`` with undefined contents, now the caller's."""
        key = self._key(shape, dtype)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            self.allocations += 1
        return empty(key[0], dtype)

    def give(self, *arrays: Any) -> None:
        """Hand buffers back (each at most once, none still read by the caller after this)."""
        with self._lock:
            for a in arrays:
                if a is None or not is_device_array(a):
                    continue
                free = self._free.setdefault(self._key(a.shape, a.dtype), [])
                if len(free) < self.per_key and all(f is not a for f in free):
                    free.append(a)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


POOL = BufferPool()


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
                   unit_params: Sequence[str], storage: str = "") -> DeviceWeights:
    """Upload ``cell.pack``'s host weights: recurrent GEMM s interleaved by ``gates[s]``. A half ``storage``
    uploads the hoisted and recurrent weights rounded to it (uint16 patterns for bfloat16) and the bias
    and per-unit vectors as float32 holding values of it (cellgen.backends.cuda.storage)."""
    module = numba_cuda()
    w_hoisted, b_hoisted, recurrent = packed
    half = storage in precision.HALF

    def matrix(w: np.ndarray) -> np.ndarray:
        return precision.to_storage(w, storage) if half else np.ascontiguousarray(w)

    def vector(v: np.ndarray) -> np.ndarray:
        if not half:
            return np.ascontiguousarray(v)
        return precision.from_storage(precision.to_storage(v, storage), storage).astype(np.float32)

    return DeviceWeights(
        hoisted=None if w_hoisted is None else module.to_device(matrix(w_hoisted)),
        bias=None if b_hoisted is None else module.to_device(vector(b_hoisted)),
        recurrent=tuple(module.to_device(matrix(interleave(w, g))) for w, g in zip(recurrent, gates, strict=True)),
        params={name: module.to_device(vector(params[name])) for name in unit_params},
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


def _block1_kernel(src, dst, mode):
    """dst = 0 (mode 0), src (1) or dst + src (2), elementwise over a 1-D array (any strides, cast on store)."""
    for e in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        if mode == 0:
            dst[e] = 0
        elif mode == 1:
            dst[e] = src[e]
        else:
            dst[e] += src[e]


def _block2_kernel(src, dst, mode):
    """:func:`_block1_kernel` over a 2-D array."""
    n0, n1 = dst.shape
    for e in range(cuda.grid(1), n0 * n1, cuda.gridsize(1)):
        i = e // n1
        j = e - i * n1
        if mode == 0:
            dst[i, j] = 0
        elif mode == 1:
            dst[i, j] = src[i, j]
        else:
            dst[i, j] += src[i, j]


def _interleave_kernel(src, dst, gates):
    """:func:`interleave` on the device: dst[r, u * gates + g] = src[r, g * units + u]."""
    rows, width = dst.shape
    units = width // gates
    for e in range(cuda.grid(1), rows * width, cuda.gridsize(1)):
        r = e // width
        c = e - r * width
        u = c // gates
        dst[r, c] = src[r, (c - u * gates) * units + u]


_COPY_KERNELS: dict[str, Any] = {}


def _copy_kernel(name: str):
    if not _COPY_KERNELS:
        _COPY_KERNELS.update(vars(jit_kernels({"permute": _permute_kernel, "reverse": _reverse_kernel,
                                               "last_input": _last_input_kernel, "block1": _block1_kernel,
                                               "block2": _block2_kernel, "interleave": _interleave_kernel})))
    return _COPY_KERNELS[name]


def _launch(name: str, total: int, *args) -> None:
    if total:
        grid = min(blocks(total, COPY_THREADS), COPY_MAX_BLOCKS)
        _copy_kernel(name)[grid, COPY_THREADS](*args)


def _block(dst, src, mode: int) -> None:
    if dst.ndim not in (1, 2):
        raise ValueError(f"a device block copy takes 1-D or 2-D arrays, got shape {tuple(dst.shape)}")
    if src is not None and tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"a device block copy needs equal shapes, got {tuple(src.shape)} into {tuple(dst.shape)}")
    _launch(f"block{dst.ndim}", int(np.prod(dst.shape)), dst if src is None else as_device(src), dst, mode)


def copy_into(dst, src) -> None:
    """``dst[...] = src`` on the device (a view of a bigger array too; the dtype cast on the store)."""
    _block(dst, src, 1)


def add_into(dst, src) -> None:
    """``dst[...] += src`` on the device."""
    _block(dst, src, 2)


def device_zeros(shape: tuple[int, ...], dtype) -> Any:
    """A zero-filled device array, filled on the device (no host upload)."""
    out = empty(shape, dtype)
    if out.ndim in (1, 2):
        _block(out, None, 0)
    else:
        _block(out.reshape(int(np.prod(out.shape))), None, 0)
    return out


def device_interleave(weight, gates: int) -> Any:
    """:func:`interleave` of a device weight into a new C-contiguous device array (gates == 1: contiguous)."""
    arr = as_device(weight)
    if gates == 1:
        return contiguous(arr)
    out = empty(arr.shape, arr.dtype)
    _launch("interleave", int(np.prod(out.shape)), arr, out, gates)
    return out


def swap_time_batch(a, allocate=None) -> Any:
    """[X, Y, F] -> a new C-contiguous [Y, X, F] device array (from ``allocate(shape, dtype)`` if given)."""
    out = (allocate or empty)((a.shape[1], a.shape[0], a.shape[2]), a.dtype)
    _launch("permute", int(np.prod(out.shape)), a, out, True)
    return out


def to_time_major(inputs, is_time_major: bool, storage: str = "") -> Any:
    """Device inputs -> C-contiguous [T, B, I] on the device (zero-copy when already so); a half
    ``storage``: inputs as the kernels hold it (float16, or uint16 patterns for bfloat16)."""
    arr = as_device(inputs)
    layout = "[max_time, batch_size, input_size]" if is_time_major else "[batch_size, max_time, input_size]"
    if arr.ndim != 3:
        raise ValueError(f"inputs must have rank 3 {layout}, got shape {tuple(arr.shape)}")
    accepted = (precision.device_dtype(storage),) if storage in precision.HALF else FLOAT_DTYPES
    if np.dtype(arr.dtype) not in accepted:
        raise ValueError(f"inputs must be float32, float64 or float16 (or marked bfloat16), got {arr.dtype}")
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
    storage: str = ""  # a half storage dtype (cellgen.backends.cuda.storage); "" where xs's dtype computes


class DeviceArrays:
    """The cuda backend's arrays: numba.cuda device arrays (host NumPy arrays are uploaded).

    The driver (:func:`cellgen.runtime.driver.dynamic_rnn`) runs the same TF semantics on these
    as on the host; only where the arrays live differs.
    """

    def prepare(self, cell: driver.CellInfo, params, inputs, sequence_length, initial_state, time_major: bool,
                hyper: dict, argument: str = "initial_state") -> DeviceCall:
        """Check every argument with the host driver's checks, then put the inputs, lengths and states on
        the device. Device arrays are checked by shape and dtype (host stand-ins without data, never a
        copy) and stay where they are: device parameters as they are, device states copied on the device
        (the kernels update states in place); a device ``sequence_length``'s values are read to check them.
        float16 and bfloat16 calls: :class:`cellgen.backends.cuda.storage.StorageArrays`."""
        numba_cuda()
        given = dict(params) if isinstance(params, Mapping) else None
        checkable = params if given is None else {k: shape_only(v) if is_device_array(v) else v
                                                  for k, v in given.items()}
        lengths = None if sequence_length is None else to_host(sequence_length)
        user_states = _state_items(initial_state)
        if user_states is not None:
            stand_ins = [shape_only(s) if is_device_array(s) else s for s in user_states]
            state_arg = stand_ins[0] if len(stand_ins) == 1 and not _is_sequence(initial_state) else stand_ins
        else:
            state_arg = initial_state if initial_state is None or not is_device_array(initial_state) \
                else shape_only(initial_state)
        on_host = not is_device_array(inputs)
        if on_host:
            call = driver.prepare(cell, checkable, inputs, lengths, state_arg, time_major, hyper, argument)
            xs = _upload(call.xs)
        else:
            xs = to_time_major(inputs, time_major)
            call = driver.prepare(cell, checkable, shape_only(xs), lengths, state_arg, True, hyper, argument)
        device_params = {k: as_device(given[k]) if given is not None and is_device_array(given[k]) else v
                         for k, v in call.params.items()}
        states = []
        for k, checked in enumerate(call.states):
            source = None if user_states is None else user_states[k]
            if initial_state is None:
                states.append(device_zeros(checked.shape, checked.dtype))
            elif source is not None and is_device_array(source):
                state = POOL.take(checked.shape, checked.dtype)
                copy_into(state, as_device(source))  # cast to the inputs' dtype on the device
                states.append(state)
            else:
                states.append(_upload(checked))
        return DeviceCall(xs, device_lengths(sequence_length, call.lengths), states, device_params, call.hyper,
                          call.sizes, on_host)

    def reverse_sequence(self, xs, lengths) -> Any:
        return reverse_sequence(xs, lengths)

    def last_input(self, call: DeviceCall, k: int) -> Any:
        return last_input(call.xs, call.lengths, call.states[k])

    def finish(self, cell: driver.CellInfo, out, states: list[Any], time_major: bool, call: DeviceCall):
        """Outputs batch-major unless ``time_major``; NumPy arrays back when the inputs were NumPy's."""
        if call.on_host:
            batch_major = None if time_major else swap_time_batch(out, POOL.take)
            host = (out if batch_major is None else batch_major).copy_to_host()
            POOL.give(batch_major)
            return host, cell.state_class(*(s.copy_to_host() for s in states))
        if not time_major:
            out = swap_time_batch(out)
        return out, cell.state_class(*states)

    def release(self, call: DeviceCall, out, states: list[Any]) -> None:
        """After :meth:`finish` of a plain forward: a host call's device inputs, outputs and states go
        back to :data:`POOL` (their values are on the host now); a device call's are the caller's."""
        if call.on_host:
            POOL.give(call.xs, out, *states)

    def to_host(self, a) -> np.ndarray:
        return to_host(a)

    def adjoint(self, call: DeviceCall, a: np.ndarray) -> Any:
        """A gradient (computed into host memory) as the call's arrays: a device array for device inputs."""
        return a if call.on_host else as_device(np.ascontiguousarray(a))


DEVICE = DeviceArrays()  # float32 / float64 calls; the modules' is cellgen.backends.cuda.storage.DEVICE
