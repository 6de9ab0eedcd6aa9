"""Half-precision storage on the CUDA backend: float16 and bfloat16 arrays, float32 arithmetic.

The CUDA kernels store inputs, weights, outputs and states in a *storage* dtype and compute in a
*compute* dtype: float32 and float64 compute in themselves; float16 and bfloat16 are storage only,
every value loaded is widened to float32 and every value stored is rounded back (round to nearest
even), so gate math and GEMM accumulation are float32 (docs/gpu.md, "Half precision").

* **float16** is NumPy's own ``np.float16``: numba types its arrays and converts on load and store.
* **bfloat16** has no NumPy dtype. On the host it is accepted as any array whose dtype is named
  ``bfloat16`` (``ml_dtypes.bfloat16``, what JAX and TensorFlow hand out) and read as its 16-bit
  patterns; on the device, and inside every kernel, a bfloat16 array is a ``uint16`` array of
  those patterns (:data:`BF16_BITS`), widened by a shift (:func:`bf16_bits_to_f32`) and rounded
  back by :func:`f32_to_bf16_bits`. The conversions are plain functions that ``cuda.jit`` compiles
  as device functions (:func:`device_functions`); in numba's simulator, where ``libdevice`` has no
  implementation, the same names are NumPy bit views.

Host helpers (:func:`bf16_from_f32`, :func:`f32_from_bf16`) are the references the tests use; they
round exactly like the device functions (ties to even, NaN kept NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

#: Storage dtypes that compute in float32, by name.
HALF = ("float16", "bfloat16")
#: Every storage dtype the CUDA backend accepts, by name.
STORAGE = ("float32", "float64", *HALF)
#: How a bfloat16 array is held on the device and read by the kernels: its 16-bit patterns.
BF16_BITS = np.dtype(np.uint16)


def storage_name(dtype: Any) -> str:
    """The storage dtype's name for a NumPy dtype (``bfloat16`` for ``ml_dtypes.bfloat16``); a
    ValueError naming the accepted ones otherwise."""
    name = np.dtype(dtype).name
    if name not in STORAGE:
        raise ValueError(f"the CUDA backend stores float32, float64, float16 or bfloat16, got {name}")
    return name


def compute_name(storage: str) -> str:
    """The dtype the kernels compute in for a storage dtype."""
    return "float32" if storage in HALF else storage


def device_dtype(storage: str) -> np.dtype:
    """The NumPy dtype of a device array holding ``storage`` (uint16 patterns for bfloat16)."""
    return BF16_BITS if storage == "bfloat16" else np.dtype(storage)


def device_storage(dtype: Any) -> str:
    """The storage dtype a kernel-side device array holds: its own dtype's name, ``bfloat16`` for
    ``uint16`` (inside the backend a uint16 array is always bfloat16 patterns; users mark theirs with
    :func:`bfloat16_device`)."""
    return "bfloat16" if np.dtype(dtype) == BF16_BITS else storage_name(dtype)


@dataclass(frozen=True)
class DeviceBfloat16:
    """A device array of bfloat16 bit patterns (``uint16``), marked as bfloat16: the explicit opt-in
    without which the CUDA backend never reads a uint16 device array as bfloat16. Made by
    :func:`bfloat16_device`; ``bits`` is the uint16 device array. A call given device bfloat16 inputs
    returns its outputs and states as ``DeviceBfloat16`` too."""

    bits: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def ndim(self) -> int:
        return len(self.bits.shape)

    @property
    def dtype(self) -> np.dtype:
        """The patterns' dtype (uint16); the values are bfloat16."""
        return BF16_BITS

    def copy_to_host(self) -> np.ndarray:
        """The values on the host as bfloat16 (``ml_dtypes.bfloat16``) values."""
        return host_bfloat16(np.asarray(self.bits.copy_to_host()))


def bfloat16_device(bits: Any) -> DeviceBfloat16:
    """Mark a uint16 device array (numba device array or ``__cuda_array_interface__``) as holding bfloat16
    bit patterns, for ``backend="cuda"`` (inputs, parameters, initial states)."""
    if isinstance(bits, DeviceBfloat16):
        return bits
    if not hasattr(bits, "__cuda_array_interface__") and not hasattr(bits, "copy_to_host"):
        raise ValueError(f"bfloat16_device takes a uint16 device array, got {type(bits).__name__}")
    if np.dtype(bits.dtype) != BF16_BITS:
        raise ValueError(f"bfloat16_device takes a uint16 device array of bfloat16 bit patterns, "
                         f"got dtype {bits.dtype}")
    return DeviceBfloat16(bits)


def host_bfloat16(bits: np.ndarray) -> np.ndarray:
    """uint16 patterns as a host bfloat16 array (``ml_dtypes.bfloat16``, a view)."""
    import ml_dtypes

    return np.ascontiguousarray(bits, dtype=BF16_BITS).view(ml_dtypes.bfloat16)


def is_bfloat16(dtype: Any) -> bool:
    """Whether a host dtype is a bfloat16 (``ml_dtypes.bfloat16`` or anything else named so)."""
    return np.dtype(dtype).name == "bfloat16"


# -- host conversions (the references) -------------------------------------------------------
def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return out.astype(np.uint16)


def f32_from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32 values (exact)."""
    wide = np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def to_storage(x: np.ndarray, storage: str) -> np.ndarray:
    """A host array rounded to ``storage``, as the device holds it (uint16 patterns for bfloat16)."""
    if storage == "bfloat16":
        if is_bfloat16(x.dtype):
            return np.ascontiguousarray(x).view(BF16_BITS)
        return bf16_from_f32(np.asarray(x, dtype=np.float32))
    return np.ascontiguousarray(x, dtype=storage)


def from_storage(x: np.ndarray, storage: str) -> np.ndarray:
    """A host copy of a device-held ``storage`` array as values (float32 for bfloat16 patterns)."""
    return f32_from_bf16(x) if storage == "bfloat16" else np.asarray(x)


# -- device conversions -------------------------------------------------------------------------
def device_functions(cuda: Any, simulated: bool) -> SimpleNamespace:
    """``bf16_to_f32(u16) -> float32``, ``f32_to_bf16(float32) -> uint16`` and ``f16_bits(float16) -> uint16``
    (the pattern, for tensor-core operands) for kernels: numba
    intrinsics (LLVM bit casts and integer rounding, inlined, compiled without a device), or in the
    simulator the same conversions by NumPy bit views. ``cuda`` is numba.cuda (unused by the
    intrinsics; the simulator's needs nothing from it either)."""
    if simulated:
        def bf16_to_f32(u):
            return np.array([np.uint32(u) << np.uint32(16)], dtype=np.uint32).view(np.float32)[0]

        def f32_to_bf16(x):
            return bf16_from_f32(np.array([x], dtype=np.float32))[0]

        def f16_bits(x):
            return np.array([x], dtype=np.float16).view(np.uint16)[0]

        return SimpleNamespace(bf16_to_f32=bf16_to_f32, f32_to_bf16=f32_to_bf16, f16_bits=f16_bits)

    if not _INTRINSICS:
        _INTRINSICS.update(bf16_to_f32=_bf16_to_f32_intrinsic(), f32_to_bf16=_f32_to_bf16_intrinsic(),
                           f16_bits=_f16_bits_intrinsic())
    return SimpleNamespace(**_INTRINSICS)


_INTRINSICS: dict[str, Any] = {}  # made once a process: numba types each intrinsic object once


def _f16_bits_intrinsic() -> Any:
    """float16 -> uint16, its bit pattern (an LLVM bit cast): what a tensor-core operand register packs."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def f16_bits(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(16))
        return types.uint16(types.float16), codegen

    return f16_bits


def _bf16_to_f32_intrinsic() -> Any:
    """uint16 -> float32 as LLVM IR (zero-extend, shift left 16, bit cast): an intrinsic, so that it
    compiles without a device (``compile_ptx``) and inlines into every kernel."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def bf16_to_f32(typingctx, u):
        def codegen(context, builder, signature, args):
            wide = builder.zext(args[0], ir.IntType(32))
            return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
        return types.float32(types.uint16), codegen

    return bf16_to_f32


def _f32_to_bf16_intrinsic() -> Any:
    """float32 -> uint16, round to nearest even, NaN kept NaN (quiet bit set), as LLVM IR."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def f32_to_bf16(typingctx, x):
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            const = lambda v: ir.Constant(i32, v)  # noqa: E731
            bits = builder.bitcast(args[0], i32)
            odd = builder.and_(builder.lshr(bits, const(16)), const(1))
            rounded = builder.lshr(builder.add(builder.add(bits, const(0x7FFF)), odd), const(16))
            nan = builder.icmp_unsigned(">", builder.and_(bits, const(0x7FFFFFFF)), const(0x7F800000))
            quiet = builder.or_(builder.lshr(bits, const(16)), const(0x0040))
            return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))
        return types.uint16(types.float32), codegen

    return f32_to_bf16
