"""Runtime (the CUDA step loop): a forward's per-step launches captured in a CUDA graph, replayed.

The launches are the ones :func:`cellgen.backends.cuda.steps.run` would otherwise issue one by one
(the same kernels, grids and arguments, in the same order): they are launched once on a capture
stream between ``cuStreamBeginCapture`` and ``cuStreamEndCapture`` (numba's own launch path, on
the stream's ``handle``), the graph is instantiated (``cuGraphInstantiate``) and launched
(``cuGraphLaunch``) on that stream. The stream is a numba stream created with
``CU_STREAM_DEFAULT`` flags, so it synchronises with the default stream the rest of a call runs on
(the hoisted GEMM before, the copies and pooled buffers after).

**Cache and invalidation.** An instantiated graph replays exactly what was captured: kernels,
grids, blocks and argument *values* (device pointers, shapes, strides, scalars). It is kept under a
key made of all of those (:func:`launch_key`), so an entry is replayed only for launches identical
to the captured ones, whatever happened to the memory in between (a buffer freed and allocated again
at the same address with the same shape gives the same launches: replaying them is right). Eight
graphs at most, least recently used dropped (``cuGraphExecDestroy``); :func:`clear` drops all.

The driver calls go through a :class:`GraphDriver` (the real one: :class:`CudaGraphDriver`,
``cuda.bindings.driver``), so that the capture logic runs in tests with a fake one; numba's
simulator cannot capture, so there :func:`run` declines and the launches run one by one.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Protocol

from cellgen.backends.cuda import runtime as _rtc

#: Instantiated graphs kept (a bidirectional pair of a few stacked layers, as the weight cache).
MAX_GRAPHS = 8
#: Per key, (the instantiated graph, the kernels it launches: kept alive while the key names them by
#: identity, the driver that made it).
CACHE: OrderedDict[tuple, tuple[Any, tuple, Any]] = OrderedDict()
_STREAMS: dict[str, Any] = {}


class GraphDriver(Protocol):
    """The driver calls a capture needs (handles are the driver's objects)."""

    def begin(self, stream: Any) -> None: ...
    def end(self, stream: Any) -> Any: ...
    def instantiate(self, graph: Any) -> Any: ...
    def launch(self, graph_exec: Any, stream: Any) -> None: ...
    def destroy_graph(self, graph: Any) -> None: ...
    def destroy_exec(self, graph_exec: Any) -> None: ...


class CudaGraphDriver:
    """:class:`GraphDriver` over ``cuda.bindings.driver`` (numba-cuda's own binding)."""

    def __init__(self) -> None:
        from cuda.bindings import driver as cu

        self.cu = cu

    def _check(self, name: str, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{name} failed: {err}")
        return rest[0] if rest else None

    def begin(self, stream: Any) -> None:
        # relaxed: numba's launch path may make calls (context queries) that a stricter mode forbids
        mode = self.cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        self._check("cuStreamBeginCapture", self.cu.cuStreamBeginCapture(stream, mode))

    def end(self, stream: Any) -> Any:
        return self._check("cuStreamEndCapture", self.cu.cuStreamEndCapture(stream))

    def instantiate(self, graph: Any) -> Any:
        return self._check("cuGraphInstantiate", self.cu.cuGraphInstantiate(graph, 0))

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self._check("cuGraphLaunch", self.cu.cuGraphLaunch(graph_exec, stream))

    def destroy_graph(self, graph: Any) -> None:
        self.cu.cuGraphDestroy(graph)

    def destroy_exec(self, graph_exec: Any) -> None:
        self.cu.cuGraphExecDestroy(graph_exec)


def _arg_key(arg: Any) -> Any:
    """What a launch captures of one argument: a device array's pointer, shape, strides and dtype; a scalar's
    type and value."""
    face = getattr(arg, "__cuda_array_interface__", None)
    if face is not None:
        return ("array", face["data"][0], tuple(face["shape"]), face.get("strides"), face["typestr"])
    return (type(arg).__name__, arg)


def launch_key(launches: list[tuple[Any, tuple, tuple, tuple]]) -> tuple:
    """Everything the captured graph depends on: per launch the kernel (by identity), grid, block and
    :func:`_arg_key` of each argument (computed once per distinct argument object)."""
    seen: dict[int, Any] = {}
    keys = []
    for kernel, grid, block, args in launches:
        parts = []
        for a in args:
            k = seen.get(id(a))
            if k is None:
                k = seen[id(a)] = _arg_key(a)
            parts.append(k)
        keys.append((id(kernel), tuple(grid), tuple(block), tuple(parts)))
    return tuple(keys)


def _stream() -> Any:
    """The capture stream (one numba stream per process, synchronising with the default stream)."""
    if "capture" not in _STREAMS:
        _STREAMS["capture"] = _rtc.numba_cuda().stream()
    return _STREAMS["capture"]


def _compile_first(launches: list[tuple[Any, tuple, tuple, tuple]]) -> None:
    """Compile and load each kernel before the capture (no module loading while the stream captures)."""
    done: set[int] = set()
    for kernel, _, _, args in launches:
        if id(kernel) in done or not hasattr(kernel, "compile"):
            continue
        done.add(id(kernel))
        compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
        compiled._codelibrary.get_cufunc()


def capture(launches: list[tuple[Any, tuple, tuple, tuple]], stream: Any, driver: GraphDriver) -> Any | None:
    """Launch ``launches`` on ``stream`` under capture and instantiate the graph; None (the capture ended, its
    partial graph destroyed, nothing ran) where any step fails."""
    handle = getattr(stream, "handle", stream)
    try:
        driver.begin(handle)
    except Exception:  # the driver cannot capture on this stream: nothing started
        return None
    try:
        for kernel, grid, block, args in launches:
            kernel[grid, block, stream](*args)
    except Exception:
        with contextlib.suppress(Exception):  # the capture was already invalidated: the stream has left it
            driver.destroy_graph(driver.end(handle))
        return None
    graph = driver.end(handle)
    try:
        return driver.instantiate(graph)
    except Exception:
        return None
    finally:
        driver.destroy_graph(graph)


def run(launches: list[tuple[Any, tuple, tuple, tuple]], driver: GraphDriver | None = None,
        stream: Any | None = None) -> bool:
    """Replay ``launches`` from the cached graph (capturing it on a miss); False where no graph can be made
    (the simulator, no ``cuda.bindings``, a failed capture): the caller then launches them itself."""
    if driver is None:
        if _rtc.simulated():
            return False
        try:
            driver = CudaGraphDriver()
            _compile_first(launches)
        except Exception:
            return False
    if stream is None:
        stream = _stream()
    handle = getattr(stream, "handle", stream)
    key = launch_key(launches)
    entry = CACHE.get(key)
    if entry is None:
        graph_exec = capture(launches, stream, driver)
        if graph_exec is None:
            return False
        entry = CACHE[key] = (graph_exec, tuple(dict.fromkeys(k for k, _, _, _ in launches)), driver)
        while len(CACHE) > MAX_GRAPHS:
            _, old = CACHE.popitem(last=False)
            old[2].destroy_exec(old[0])
    CACHE.move_to_end(key)
    entry[2].launch(entry[0], handle)
    return True


def clear() -> None:
    """Destroy every cached graph."""
    while CACHE:
        _, entry = CACHE.popitem()
        entry[2].destroy_exec(entry[0])
