"""Runtime (the CUDA step loop): how a forward runs its T steps, chosen per call.

Three ways, from fastest to plainest (docs/gpu.md, "The step loop"):

* ``persistent``: the layout's persistent kernel (:class:`cellgen.backends.cuda.layout.PersistentKernel`),
  one cooperative launch for all T steps, each block's weight slices in dynamic shared memory;
  only where the device launches cooperative grids and the slices fit (:func:`persistent_grid`);
* ``graph``: the per-step launches captured once in a CUDA graph and replayed
  (:mod:`cellgen.backends.cuda.graph`);
* ``launches``: the per-step launches, one by one.

``auto`` (the default) takes the first that applies; ``CELLGEN_CUDA_STEPS`` (or :func:`forced`)
forces one. A forced or chosen path that cannot run falls back to the next (a persistent kernel
that does not fit, a device without cooperative launch, a graph that cannot be captured: the
simulator), never to a wrong number: every path runs the same printed epilogues in the same order.
:func:`last_path` says which path the last forward took (for tests and ``cellgen gpu-check``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cellgen.backends.cuda import graph as _graph
from cellgen.backends.cuda import mma as _mma
from cellgen.backends.cuda import precision as _precision
from cellgen.backends.cuda import runtime as _rtc
from cellgen.backends.cuda.layout import group_rows, slice_tile_k

#: The environment variable that forces a path.
ENV = "CELLGEN_CUDA_STEPS"
MODES = ("auto", "persistent", "graph", "launches")
#: Fraction of the opt-in shared memory per block the weight slices may take (the rest: the operand tile,
#: the driver's reservation, headroom for a later static array).
SHARED_BUDGET = 0.9
_LAST: list[str | None] = [None]  # the path the last forward took
_FORCED: str | None = None
_GRID: list[int | None] = [None]  # the blocks of the last persistent launch
_SIM_BLOCKS = [1]  # co-resident blocks the simulator claims (tests: more, for one-step partition checks)


def last_path() -> str | None:
    """The path the last forward's step loop took: "persistent", "graph" or "launches" (None: none yet, or
    :func:`forget` since)."""
    return _LAST[0]


def last_grid() -> int | None:
    """The blocks of the last persistent launch (None: none since :func:`forget`)."""
    return _GRID[0]


def forget() -> None:
    """Clear :func:`last_path` and :func:`last_grid`."""
    _LAST[0] = _GRID[0] = None


def requested() -> str:
    """The path asked for: :func:`forced`'s, else ``CELLGEN_CUDA_STEPS``, else ``auto``."""
    value = _FORCED or os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def forced(mode: str, simulated_blocks: int = 1) -> Iterator[None]:
    """Force ``mode`` for the forwards run inside the block (tests, ``cellgen gpu-check``).

    ``simulated_blocks``: the co-resident blocks numba's simulator claims for the persistent kernel. The
    simulator runs blocks one after another and its grid barrier is a block barrier, so a grid of more
    than one block is right there only where no block reads what another writes in the same launch: one
    step of a one-stage cell (tests use it to check how the grid splits chunks and rows)."""
    global _FORCED
    if mode not in MODES:
        raise ValueError(f"unknown step mode {mode!r}: expected one of {', '.join(MODES)}")
    before, _FORCED = _FORCED, mode
    blocks_before, _SIM_BLOCKS[0] = _SIM_BLOCKS[0], simulated_blocks
    try:
        yield
    finally:
        _FORCED = before
        _SIM_BLOCKS[0] = blocks_before


def mode(persistent: bool) -> str:
    """The path to try first: ``persistent`` where the cell has a persistent kernel and auto or it is asked
    for, ``graph`` for auto otherwise, or the forced one (a forced ``persistent`` without the kernel: ``graph``)."""
    asked = requested()
    if asked in ("auto", "persistent"):
        return "persistent" if persistent else "graph"
    return asked


@dataclass(frozen=True)
class StageShape:
    """What one stage's weight slice needs: K rows, D units, and ``columns`` weight columns per unit chunk."""

    rows: int
    units: int
    columns: int


def chunks(units: int, width: int = 32) -> int:
    """Unit chunks of a stage (a warp's ``width`` units each)."""
    return max(1, -(-int(units) // width))


def shared_bytes(stages: Sequence[StageShape], stride: int, itemsize: int) -> int:
    """Dynamic shared memory per block of the persistent kernel whose blocks take every ``stride``-th unit
    chunk: per stage, ceil(chunks / stride) slices of K (padded to the kernel's K tile,
    :func:`~cellgen.backends.cuda.layout.slice_tile_k`) x columns elements.

    >>> shared_bytes([StageShape(256, 256, 128)], 8, 4)  # basic_lstm H=256 float32: one 256 x 128 slice
    131072
    >>> shared_bytes([StageShape(37, 37, 128), StageShape(37, 37, 32)], 1, 8)  # lstm H=37 in one block: 2 chunks
    163840
    """
    total, tile_k = 0, slice_tile_k(itemsize)
    for s in stages:
        per_block = -(-chunks(s.units) // stride)
        total += per_block * (-(-int(s.rows) // tile_k) * tile_k) * s.columns * itemsize
    return total


def grid_split(stages: Sequence[StageShape], groups: int, capacity: int) -> tuple[int, int]:
    """(blocks, chunk stride P) of the persistent kernel for ``groups`` row groups on ``capacity`` co-resident
    blocks. With C = the widest stage's unit chunks: where C blocks fit, S = min(capacity // C, groups) blocks
    share each chunk (block k: chunk k % C, row groups k // C, k // C + S, ...), C * S blocks, each keeping one
    slice per stage; else ``capacity`` blocks, block k taking chunks k, k + capacity, ... and every row group.
    The kernel derives the same S = max(1, blocks // C) and P = blocks // S from its grid.

    >>> grid_split([StageShape(256, 256, 128)], 16, 132)  # B=64 (16 groups of 4), 8 chunks: 16 blocks a chunk
    (128, 8)
    >>> grid_split([StageShape(256, 256, 128)], 2, 132), grid_split([StageShape(99, 99, 32)], 5, 2)
    ((16, 8), (2, 2))
    """
    widest = max(chunks(s.units) for s in stages)
    if capacity >= widest:
        return widest * max(1, min(capacity // widest, groups)), widest
    return capacity, capacity


def persistent_grid(stages: Sequence[StageShape], itemsize: int, capacity: int, limit: int,
                    groups: int = 1) -> tuple[int, int] | None:
    """(blocks, dynamic shared bytes) of the persistent kernel, or None where it cannot run.

    ``capacity``: the co-resident blocks the device can hold for a cooperative launch (at the shared
    memory asked for, see :func:`_device_limits`); ``limit``: the dynamic shared memory a block may have;
    ``groups``: the row groups of the batch (:func:`grid_split`). None where the slices do not fit in
    ``SHARED_BUDGET * limit``.

    >>> persistent_grid([StageShape(256, 256, 128)], 4, 132, 232448, groups=16)
    (128, 131072)
    >>> persistent_grid([StageShape(768, 768, 128)], 4, 132, 232448) is None  # 384 KiB a slice
    True
    >>> persistent_grid([StageShape(37, 37, 128)], 4, 1, 232448)  # the simulator: one block, both chunks
    (1, 65536)
    >>> persistent_grid([StageShape(768, 768, 128)], 2, 132, 232448)  # half storage: 192 KiB, fits an H100/H200
    (24, 196608)
    """
    if capacity < 1:
        return None
    blocks, stride = grid_split(stages, groups, capacity)
    need = shared_bytes(stages, stride, itemsize)
    if need > SHARED_BUDGET * limit:
        return None
    return blocks, need


def _device_limits(kernel: Any, block: tuple[int, int], args: tuple, stages: Sequence[StageShape],
                   itemsize: int, groups: int) -> tuple[int, int] | None:
    """(blocks, shared bytes) on this device, with the kernel's max-dynamic-shared-size attribute raised to
    what it needs; None where the device cannot launch it cooperatively or the slices do not fit."""
    cuda = _rtc.numba_cuda()
    if _rtc.simulated():  # numba's simulator: cooperative grids of one block (tests may ask for more)
        return persistent_grid(stages, itemsize, _SIM_BLOCKS[0], 1 << 30, groups)
    device = cuda.get_current_device()
    if not getattr(device, "COOPERATIVE_LAUNCH", 0):
        return None
    limit = int(device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    static = int(compiled._codelibrary.get_cufunc().attrs.shared)
    capacity = int(device.MULTIPROCESSOR_COUNT)  # at most one of these blocks an SM: their slices fill it
    for _ in range(4):  # the grid bounds the smem a block needs, the smem bounds the co-resident grid
        found = persistent_grid(stages, itemsize, capacity, limit - static, groups)
        if found is None:
            return None
        blocks, need = found
        set_max_dynamic_shared(compiled, need)
        capacity = int(compiled.max_cooperative_grid_blocks(block, need))
        if capacity >= blocks:
            return found
    return None


def set_max_dynamic_shared(compiled: Any, nbytes: int) -> None:
    """Raise a compiled kernel's ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` to ``nbytes`` (above the
    48 KiB a launch may ask for without it), as numba's own ``set_shared_memory_carveout`` sets its attribute."""
    from numba.cuda.cudadrv.driver import binding, driver

    cufunc = compiled._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)


def persistent(kernel: Any, block: tuple[int, int], args: tuple, storage: str,
               stages: Sequence[tuple[int, int, int]], batch: int) -> bool:
    """Launch the persistent kernel for all T steps if this device can: True when launched, False (nothing
    launched, nothing written) where it cannot, so that the caller runs the per-step path instead.

    ``storage``: the storage dtype's name. With half storage the kernel's GEMMs are tensor-core MMAs
    (row groups of :func:`~cellgen.backends.cuda.layout.group_rows` rows), which need sm_80 or newer
    (:func:`cellgen.backends.cuda.mma.supported`); on an older GPU the per-step kernels run."""
    shapes = [StageShape(int(r), int(u), int(c)) for r, u, c in stages]
    if storage in _precision.HALF and not _mma.supported():
        return False
    itemsize = _precision.device_dtype(storage).itemsize
    groups = max(1, -(-int(batch) // group_rows(itemsize, block[1])))
    try:
        found = _device_limits(kernel, block, args, shapes, itemsize, groups)
    except _rtc.CudaUnavailable:
        raise
    except Exception:  # a driver without the attribute or the query: the per-step path is always correct
        found = None
    if found is None:
        return False
    blocks, need = found
    try:
        kernel[(blocks, 1), block, 0, need](*args)
    except Exception as err:  # e.g. CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: refused before it ran
        if not _launch_refused(err):
            raise
        return False
    _LAST[0], _GRID[0] = "persistent", blocks
    return True


def _launch_refused(err: Exception) -> bool:
    """A launch the driver refused (it never ran) rather than a fault of a running kernel."""
    text = str(err)
    return any(code in text for code in ("COOPERATIVE_LAUNCH_TOO_LARGE", "LAUNCH_OUT_OF_RESOURCES",
                                         "INVALID_VALUE", "NOT_SUPPORTED"))


def run(launches: list[tuple[Any, tuple, tuple, tuple]], graph: bool) -> None:
    """Run the per-step launches ``(kernel, grid, block, args)`` in order: replayed from a CUDA graph when
    ``graph`` and the driver can capture them, else launched one by one on the default stream."""
    if graph and launches and _graph.run(launches):
        _LAST[0] = "graph"
        return
    for kernel, grid, block, args in launches:
        kernel[grid, block](*args)
    _LAST[0] = "launches"


#: Devices the ``cellgen show`` figures assume: (SMs, opt-in shared memory per block).
DEVICES = {"H100/H200": (132, 232448), "A100": (108, 166912)}


#: ``cellgen show``'s element sizes, by the dtypes that store them (half storage: 2 bytes a weight in shared memory).
ELEMENT_NAMES = {4: "float32", 8: "float64", 2: "float16/bfloat16"}


def describe(layout: Any, batch: int, sizes: dict, itemsizes: Sequence[int] = (4, 8, 2)) -> list[str]:
    """``cellgen show``'s lines on the CUDA step loop of ``layout`` (a :class:`CudaLayout`) at ``batch`` rows and
    ``sizes`` (size symbol -> int): the per-step kernels' blocks, and per dtype and device whether the
    persistent kernel's weight slices fit (then its grid and shared memory per block) or the graph runs."""
    import sympy

    if layout.scan:
        return ["GPU step loop: none (a scan-only cell: one kernel with the time loop inside)"]
    rows = layout.all_rows_max
    kernels = layout.all_rows if batch <= rows else layout.kernels
    blocks = ", ".join(f"{k.name} {k.block[0]}x{k.block[1]}" for k in kernels)
    lines = [f"GPU per-step kernels at B={batch}: {blocks}"
             + (f"  (B <= {rows}: one block over all rows)" if batch <= rows else "")]
    p = layout.persistent
    if p is None:
        lines.append("GPU step loop: CUDA graph of the per-step launches (no persistent kernel: an unfused epilogue)")
        return lines
    shapes = [StageShape(int(sympy.sympify(k.gemm.rows).subs(sizes)), int(sympy.sympify(k.gemm.units).subs(sizes)),
                         k.gemm.columns) for k in p.stages]
    for itemsize in itemsizes:
        for device, (sms, optin) in DEVICES.items():
            groups = -(-batch // p.group_rows(itemsize))
            limit = optin - p.static_shared(itemsize)  # as _device_limits: the opt-in less the static arrays
            found = persistent_grid(shapes, itemsize, sms, limit, groups)
            dtype = ELEMENT_NAMES[itemsize]
            if found is None:
                need = shared_bytes(shapes, grid_split(shapes, groups, sms)[1], itemsize)
                lines.append(f"GPU step loop ({dtype}, {device}): CUDA graph (the weight slices need "
                             f"{need / 1024:.0f} KiB a block > {SHARED_BUDGET:.0%} of {limit / 1024:.0f} KiB)")
            else:
                lines.append(f"GPU step loop ({dtype}, {device}): persistent, {found[0]} blocks of "
                             f"{p.block[0]}x{p.block[1]}, {found[1] / 1024:.0f} KiB of weight a block, "
                             f"{len(p.stages)} grid barrier(s) a step")
    return lines
