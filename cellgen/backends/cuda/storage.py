"""CUDA runtime: calls whose arrays are stored in a half dtype (float16, bfloat16), computed in float32.

What is stored in the half dtype, and what is not (docs/gpu.md, "Half precision"):

* **storage** (the user's arrays, in the call's storage dtype): the inputs, the parameters (uploaded
  rounded to it: the hoisted and recurrent weights in it, half the bytes), the delay states (a
  kernel reads them as the input at t - 1), the outputs, and the final states handed back;
* **float32** (internal): the pre-activations the hoisted GEMM writes, the recurrent GEMMs'
  accumulators and results, the operand buffers, the recurrent states while the time loop runs
  (float32 working copies of the initial states, rounded to the storage dtype once at the end), the
  biases and per-unit parameter vectors (their storage values, held as float32).

The host checks of :mod:`cellgen.runtime.driver` run on float32 stand-ins (widening is exact), so
a half call is checked, and errs, exactly as a float32 one. The storage dtype is the inputs':
``np.float16`` arrays (host or device), host arrays whose dtype is named ``bfloat16``
(``ml_dtypes.bfloat16``), or device arrays marked by
:func:`cellgen.backends.cuda.precision.bfloat16_device`; parameters must be in the same dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cellgen.backends.cuda import gemm, precision
from cellgen.backends.cuda import runtime as rt
from cellgen.runtime import driver

COMPUTE = np.dtype(np.float32)
cuda = None  # numba.cuda, bound by _conversion() (the kernels below read it; the simulator swaps it)
_bf16_to_f32 = _f32_to_bf16 = None  # bound by _conversion() (cellgen.backends.cuda.precision.device_functions)
_KERNELS: dict[tuple[str, str], Any] = {}


# -- conversion kernels ---------------------------------------------------------------------------
def _widen_bf16(src, dst):
    for e in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[e] = _bf16_to_f32(src[e])


def _round_bf16(src, dst):
    for e in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[e] = _f32_to_bf16(src[e])


def _widen_f16(src, dst):
    for e in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[e] = np.float32(src[e])


def _round_f16(src, dst):  # numba's cast on the store: round to nearest even
    for e in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[e] = src[e]


#: The flat grid-stride conversion kernels by (storage, direction): dst[e] = float32(src[e]) or storage(src[e]).
_SOURCES = {("bfloat16", "widen"): _widen_bf16, ("bfloat16", "round"): _round_bf16,
            ("float16", "widen"): _widen_f16, ("float16", "round"): _round_f16}


def _conversion(storage: str, widen: bool) -> Any:
    global cuda, _bf16_to_f32, _f32_to_bf16
    key = (storage, "widen" if widen else "round")
    if key not in _KERNELS:
        cuda = rt.numba_cuda()
        convert = precision.device_functions(cuda, rt.simulated())
        _bf16_to_f32, _f32_to_bf16 = convert.bf16_to_f32, convert.f32_to_bf16
        _KERNELS[key] = cuda.jit(_SOURCES[key])
    return _KERNELS[key]


def _convert(src: Any, dtype: np.dtype, storage: str, widen: bool, allocate: Callable | None = None) -> Any:
    out = (allocate or rt.empty)(tuple(src.shape), dtype)
    total = int(np.prod(src.shape))
    if total:
        flat_src = rt.contiguous(src).reshape(total)
        grid = min(rt.blocks(total, rt.COPY_THREADS), rt.COPY_MAX_BLOCKS)
        _conversion(storage, widen)[grid, rt.COPY_THREADS](flat_src, out.reshape(total))
    return out


def widen(src: Any, storage: str, allocate: Callable | None = None) -> Any:
    """A device array of ``storage`` values (uint16 patterns for bfloat16) as a new float32 device array."""
    return _convert(src, COMPUTE, storage, True, allocate)


def round_to(src: Any, storage: str, allocate: Callable | None = None) -> Any:
    """A float32 device array rounded to ``storage`` (nearest even) into a new device array."""
    return _convert(src, precision.device_dtype(storage), storage, False, allocate)


# -- the hoisted GEMM ------------------------------------------------------------------------------
def hoisted_gemm(xs: Any, weight: Any, bias: Any, allocate: Callable | None = None) -> Any:
    """``xs [T, B, I] @ weight + bias`` over all T*B rows: for a half ``xs`` and ``weight`` (storage dtype;
    float32 bias) the GEMM's ``storage=`` (float32 accumulation and result), float32 and float64 as they are."""
    storage = precision.device_storage(xs.dtype)
    return gemm.hoisted_gemm(xs, weight, bias, allocate, storage=storage if storage in precision.HALF else None)


# -- a half call's arrays ----------------------------------------------------------------------------
def call_storage(inputs: Any) -> str:
    """The storage dtype of a call, from its inputs: float32/float64 as they are, float16, bfloat16 (a
    host ``bfloat16`` array or a marked device array); a ValueError for an unmarked uint16 device array."""
    if isinstance(inputs, precision.DeviceBfloat16):
        return "bfloat16"
    dtype = getattr(inputs, "dtype", None)
    if dtype is None:
        return "float32"  # not an array: the host checks name what was expected
    dtype = np.dtype(dtype)
    if precision.is_bfloat16(dtype):
        return "bfloat16"
    if dtype == precision.BF16_BITS and rt.is_device_array(inputs):
        raise ValueError("inputs is a uint16 device array: a device array is read as bfloat16 only when marked "
                         "(cellgen.backends.cuda.precision.bfloat16_device(array)); expected float32, float64 "
                         "or float16 device arrays, or a marked bfloat16 one")
    return dtype.name if dtype.name in precision.HALF else "float32"


def _is_device(a: Any) -> bool:
    return isinstance(a, precision.DeviceBfloat16) or rt.is_device_array(a)


def _device_bits(a: Any, storage: str, what: str) -> Any:
    """A user's device array of the call's storage dtype, as the kernels hold it (uint16 for bfloat16)."""
    if storage == "bfloat16":
        if not isinstance(a, precision.DeviceBfloat16):
            dtype = np.dtype(rt.as_device(a).dtype)
            raise ValueError(f"{what} must be bfloat16 like the inputs (a device array marked by "
                             f"cellgen.backends.cuda.precision.bfloat16_device), got a {dtype} device array")
        return rt.as_device(a.bits)
    arr = rt.as_device(a)
    if np.dtype(arr.dtype) != np.dtype(storage):
        raise ValueError(f"{what} has dtype {arr.dtype}, expected {storage} (the inputs' dtype)")
    return arr


def _host_values(a: Any, storage: str, what: str, exact: bool = True) -> np.ndarray:
    """A user's host array as float32 values of ``storage``: in that dtype (``exact``: nothing else), or
    for states also float32/float64 (rounded to it)."""
    arr = np.asarray(a)
    name = "bfloat16" if precision.is_bfloat16(arr.dtype) else arr.dtype.name
    allowed = (storage,) if exact else (storage, "float32", "float64")
    if name not in allowed:
        raise ValueError(f"{what} has dtype {name}, expected {' or '.join(allowed)} (the inputs' dtype is {storage})")
    return precision.from_storage(precision.to_storage(arr, storage), storage).astype(COMPUTE)


def _stand_in(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype=COMPUTE), tuple(int(d) for d in shape))


def prepare(cell: driver.CellInfo, params, inputs, sequence_length, initial_state, time_major: bool,
            hyper: dict, argument: str, storage: str) -> rt.DeviceCall:
    """:meth:`cellgen.backends.cuda.runtime.DeviceArrays.prepare` for a half ``storage``: the host checks
    on float32 stand-ins, then the inputs and delay states on the device in ``storage``, the recurrent
    states as float32 working copies, the parameters as float32 values of ``storage``: host ones on the
    host (packed, rounded and uploaded once while unchanged: :mod:`cellgen.backends.cuda.reuse`), device
    ones widened on the device (packed there and rounded back to ``storage``, no host trip)."""
    rt.numba_cuda()
    host_params, device_params = params, {}
    if isinstance(params, Mapping):
        host_params = {}
        for k, v in params.items():
            if _is_device(v):
                device_params[k] = widen(_device_bits(v, storage, f"parameter {k!r}"), storage)
                host_params[k] = _stand_in(device_params[k].shape)
            else:
                host_params[k] = _host_values(v, storage, f"parameter {k!r}")
    user_states = _user_states(initial_state)
    state_arg: Any = initial_state
    if user_states is not None:
        converted = [_stand_in(_device_bits(s, storage, _state_name(cell, argument, k)).shape) if _is_device(s)
                     else _host_values(s, storage, _state_name(cell, argument, k), exact=False)
                     for k, s in enumerate(user_states)]
        state_arg = converted[0] if len(converted) == 1 and not isinstance(initial_state, list | tuple) else converted
    lengths = None if sequence_length is None else rt.to_host(sequence_length)
    on_host = not _is_device(inputs)
    if on_host:
        call = driver.prepare(cell, host_params, _host_values(inputs, storage, "inputs"), lengths, state_arg,
                              time_major, hyper, argument)
        xs = rt.POOL.take(call.xs.shape, precision.device_dtype(storage))
        if call.xs.size:
            xs.copy_to_device(precision.to_storage(call.xs, storage))
    else:
        xs = rt.to_time_major(_device_bits(inputs, storage, "inputs"), time_major, storage)
        call = driver.prepare(cell, host_params, _stand_in(xs.shape), lengths, state_arg, True, hyper, argument)
    states = []
    for k, checked in enumerate(call.states):
        delay = cell.input_state[k]
        source = None if user_states is None else user_states[k]
        if source is not None and _is_device(source):
            bits = _device_bits(source, storage, _state_name(cell, argument, k))
            states.append(rt.copy(bits) if delay else widen(bits, storage, rt.POOL.take))
        elif delay:
            states.append(rt.as_device(precision.to_storage(checked, storage)))
        else:
            states.append(rt.as_device(np.ascontiguousarray(checked, dtype=COMPUTE)))
    params = {k: device_params.get(k, v) for k, v in call.params.items()}
    return rt.DeviceCall(xs, rt.device_lengths(sequence_length, call.lengths), states, params, call.hyper,
                         call.sizes, on_host, storage)


class StorageArrays(rt.DeviceArrays):
    """The cuda backend's arrays (:class:`cellgen.backends.cuda.runtime.DeviceArrays`) for every storage
    dtype: float32 / float64 calls as they are, float16 / bfloat16 ones by :func:`prepare` and
    :func:`result` (outputs and states handed back in the storage dtype)."""

    def prepare(self, cell: driver.CellInfo, params, inputs, sequence_length, initial_state, time_major: bool,
                hyper: dict, argument: str = "initial_state") -> rt.DeviceCall:
        rt.numba_cuda()  # binds what tells device arrays apart
        storage = call_storage(inputs)
        if storage not in precision.HALF:
            return super().prepare(cell, params, inputs, sequence_length, initial_state, time_major, hyper, argument)
        return prepare(cell, params, inputs, sequence_length, initial_state, time_major, hyper, argument, storage)

    def finish(self, cell: driver.CellInfo, out, states: list[Any], time_major: bool, call: rt.DeviceCall):
        if call.storage not in precision.HALF:
            return super().finish(cell, out, states, time_major, call)
        batch_major = out if time_major else rt.swap_time_batch(out, rt.POOL.take if call.on_host else None)
        outputs = result(batch_major, call.storage, call.on_host)
        if call.on_host and batch_major is not out:
            rt.POOL.give(batch_major)
        return outputs, cell.state_class(*(result(s, call.storage, call.on_host) for s in states))

    def release(self, call: rt.DeviceCall, out, states: list[Any]) -> None:
        if call.storage in precision.HALF and not call.on_host:  # the float32 working copies, now rounded
            rt.POOL.give(*(s for s in states if np.dtype(s.dtype) == COMPUTE))
            return
        super().release(call, out, states)


#: The arrays every generated module's cuda backend runs on (``_backend_cuda``).
DEVICE = StorageArrays()


def _state_name(cell: driver.CellInfo, argument: str, k: int) -> str:
    """``initial_state.c``, as the float32 checks name a state (``initial_state[k]`` past the cell's states)."""
    return f"{argument}.{cell.state[k]}" if k < len(cell.state) else f"{argument}[{k}]"


def _user_states(initial_state) -> list[Any] | None:
    if isinstance(initial_state, list | tuple):
        return list(initial_state)
    if initial_state is not None and (_is_device(initial_state) or hasattr(initial_state, "shape")):
        return [initial_state]
    return None


def result(a: Any, storage: str, on_host: bool) -> Any:
    """A device array of the call (float32 working copy or storage) as the user gets it: rounded to
    ``storage``; on the host as float16 / ``ml_dtypes.bfloat16``, on the device float16 or marked bfloat16."""
    if np.dtype(a.dtype) == COMPUTE:
        a = round_to(a, storage)
    if on_host:
        host = a.copy_to_host()
        return precision.host_bfloat16(host) if storage == "bfloat16" else host
    return precision.DeviceBfloat16(a) if storage == "bfloat16" else a
