"""CUDA runtime: what one ``backend="cuda"`` call keeps for the next, the packed weights and the buffers.

* :class:`WeightCache`: a cell's packed, uploaded weights from **host** (NumPy) parameters, reused
  while the parameters are unchanged. An entry is found by where the parameters' data lives (data
  pointer, shape, strides, dtype: a cheap key) and used only if every parameter still
  holds, byte for byte, what it held when it was packed (a snapshot taken then): an array changed in
  place, or new data at a recycled address, is packed and uploaded again. The comparison reads
  the parameters once on the host, less than packing them (a read and a write), interleaving and
  uploading them; a sampled or hashed check could miss a change and give a wrong number silently.
* **Device** parameters (numba device arrays, ``__cuda_array_interface__`` tensors) are never
  cached: whether one changed cannot be known without reading it, and reading it on the device
  costs what packing it there does (:func:`device_weights`: device-to-device copies, no host trip;
  half ones widened, packed and rounded back on the device).
* Buffers: :data:`cellgen.backends.cuda.runtime.POOL` (:class:`~cellgen.backends.cuda.runtime.BufferPool`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cellgen.backends.cuda import precision
from cellgen.backends.cuda import runtime as rt
from cellgen.backends.cuda import storage as _storage

#: Cached packed weights (all cells together): enough for a bidirectional pair of a few stacked layers.
WEIGHT_ENTRIES = 8


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` holds exactly ``b``'s bytes (NaNs and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def _identity(params: Mapping[str, np.ndarray]) -> tuple:
    """Where each parameter's data lives and how (not ``id``: ``np.asarray`` of a CPU tensor is a new
    array over the same memory on every call)."""
    return tuple((name, a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
                 for name, a in sorted(params.items()))


class WeightCache:
    """Packed device weights of host parameters, keyed by the arrays and checked against their contents."""

    def __init__(self, entries: int = WEIGHT_ENTRIES) -> None:
        self.entries = entries
        self._cache: OrderedDict[tuple, tuple[dict[str, np.ndarray], Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.packs = 0  # how many times weights were packed and uploaded (a miss)

    def get(self, owner: str, params: Mapping[str, np.ndarray], build: Callable[[], Any]) -> Any:
        """``build()``'s weights for ``owner`` (a cell) and these host ``params``, or the cached ones if
        every parameter still holds the bytes it held when they were built."""
        key = (owner, _identity(params))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and all(_same_bytes(params[k], v) for k, v in hit[0].items()):
                self._cache.move_to_end(key)
                return hit[1]
        snapshot = {k: np.array(v, copy=True, order="C") for k, v in params.items()}
        weights = build()
        with self._lock:
            self.packs += 1
            self._cache[key] = (snapshot, weights)
            self._cache.move_to_end(key)
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return weights

    def clear(self) -> None:
        """Drop every cached weight (their device memory is freed when nothing else holds them)."""
        with self._lock:
            self._cache.clear()


WEIGHTS = WeightCache()


def clear() -> None:
    """Free every cached weight and pooled buffer."""
    WEIGHTS.clear()
    rt.POOL.clear()


def on_device(params: Mapping[str, Any]) -> bool:
    """Whether any parameter is a device array (then the weights are packed on the device)."""
    return any(rt.is_device_array(v) for v in params.values())


def weights(owner: str, params: Mapping[str, Any], sizes: Mapping[str, int], pack: Callable, device_pack: Callable,
            gates: Sequence[int], unit_params: Sequence[str], storage: str = "") -> rt.DeviceWeights:
    """A call's device weights: cached for host parameters, packed on the device for device ones.
    ``storage``: the call's storage dtype (``precision.device_storage``); a half one (float16, bfloat16)
    caches apart and uploads in it (its parameters are host float32 values of it:
    :func:`cellgen.backends.cuda.storage.prepare`)."""
    if on_device(params):
        return device_weights(device_pack({k: rt.as_device(v) for k, v in params.items()}, sizes), params, gates,
                              unit_params, storage)
    return WEIGHTS.get(f"{owner}:{storage}" if storage in precision.HALF else owner, params,
                       lambda: rt.upload_weights(pack(params, sizes), params, gates, unit_params, storage))


def device_weights(packed, params: Mapping[str, Any], gates: Sequence[int],
                   unit_params: Sequence[str], storage: str = "") -> rt.DeviceWeights:
    """:func:`~cellgen.backends.cuda.runtime.upload_weights` for weights packed on the device. A half
    ``storage``: the parameters are float32 device arrays of its values (``storage.prepare``), packed in
    float32 as the host packs them; the hoisted and recurrent weights are rounded to ``storage`` on the
    device (the host path's rounding), the bias and per-unit vectors stay float32."""
    def matrix(w: Any) -> Any:
        return _storage.round_to(w, storage) if storage in precision.HALF else w

    w_hoisted, b_hoisted, recurrent = packed
    return rt.DeviceWeights(
        hoisted=None if w_hoisted is None else matrix(rt.contiguous(w_hoisted)),
        bias=None if b_hoisted is None else rt.contiguous(b_hoisted),
        recurrent=tuple(matrix(rt.device_interleave(w, g)) for w, g in zip(recurrent, gates, strict=True)),
        params={name: rt.contiguous(rt.as_device(params[name])) for name in unit_params},
    )
