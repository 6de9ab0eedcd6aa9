"""``cellgen gpu-check``'s timings: CUDA events around the input GEMM, the step loop and the whole call.

Per spec and shape (float32, the issue's B64 T100 H256 and B16 T1024 H768; ``--quick``: tiny), the
median of ``repeat`` timed calls after ``warmup`` untimed ones, each between two recorded and
synchronised CUDA events:

* ``input_gemm_ms``: the hoisted GEMM alone (all T*B input rows);
* ``forward_ms``: the backend's forward on device arrays, weights already on the device (GEMM + T
  step launches); ``step_loop_ms`` = forward - input GEMM;
* ``call_ms``: ``dynamic_rnn(..., backend="cuda")`` on device inputs with host parameters (checks,
  the cached weights, buffers from the pool);
* ``host_launch_ms``: the host's wall time to issue the forward's launches (no synchronisation):
  ``launch-bound`` when it is at least 80% of the forward's GPU time, else ``GPU-bound``;
* ``cudnn_ms``: torch's ``nn.LSTM`` / ``GRU`` of the same size on cuDNN where torch sees a GPU;
* ``paths``: the forward with each step loop forced (:mod:`cellgen.backends.cuda.steps`: ``persistent``,
  ``graph``, ``launches``): its median time, the path that actually ran (a persistent kernel that does not
  fit runs the graph) and the largest difference of its output from the automatic choice's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from cellgen.backends.cuda import gemm as cuda_gemm
from cellgen.backends.cuda import runtime as rtc
from cellgen.backends.cuda import steps
from cellgen.tools.bench_cuda import GPU_SHAPES, _event_times, _torch_row

#: The specs timed (where loaded): the issue's LSTMs and the cuDNN GRU.
TIMED = ("basic_lstm", "lstm", "gru_cudnn")
QUICK_SHAPES = {"tiny": (2, 3, 4, 4)}


def _setup(module: ModuleType, shape: tuple[int, int, int, int]):
    batch, steps, isize, units = shape
    sizes = {name: units for name in module.SIZES}
    params = module.init_params(isize, units, dtype=np.float32, seed=0, **sizes)
    inputs = np.random.default_rng(0).standard_normal((steps, batch, isize)).astype(np.float32)
    call = rtc.DEVICE.prepare(module._CELL, params, rtc.as_device(inputs), None, None, True, {})
    weights = rtc.upload_weights(module._CELL.pack(call.params, call.sizes), call.params, module._CUDA_GATES,
                                 module._CUDA_UNIT_PARAMS)
    return params, call, weights


def time_one(module: ModuleType, label: str, shape: tuple[int, int, int, int], repeat: int, warmup: int,
             torch: bool = True) -> dict[str, Any]:
    """One row of the timing table (see the module)."""
    cuda = rtc.numba_cuda()
    params, call, weights = _setup(module, shape)
    initial = tuple(call.states)

    def forward():
        states = [rtc.copy(s) for s in initial]
        return module._cuda_forward(weights, call.xs, call.lengths, states, call.hyper, call.sizes)

    def median(fn) -> float | None:
        ms = _event_times(fn, repeat, warmup, cuda.event, lambda a, b: a.elapsed_time(b))["median_ms"]
        return None if rtc.simulated() else ms  # the simulator's events record no time

    row: dict[str, Any] = {"spec": module.NAME, "shape": label, "B": shape[0], "T": shape[1], "I": shape[2],
                           "H": shape[3]}
    row["input_gemm_ms"] = median(lambda: cuda_gemm.hoisted_gemm(call.xs, weights.hoisted, weights.bias)) \
        if weights.hoisted is not None else 0.0
    row["forward_ms"] = median(forward)
    gemm, whole = row["input_gemm_ms"], row["forward_ms"]
    row["step_loop_ms"] = None if gemm is None or whole is None else max(whole - gemm, 0.0)
    row["call_ms"] = median(lambda: module.dynamic_rnn(params, call.xs, time_major=True, backend="cuda"))
    host = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        forward()
        host.append((time.perf_counter() - start) * 1e3)
        cuda.synchronize()
    row["host_launch_ms"] = float(np.median(host))
    if rtc.simulated():
        row["bound"] = "n/a (simulator: no GPU time)"
    else:
        row["bound"] = "launch-bound" if row["host_launch_ms"] >= 0.8 * row["forward_ms"] else "GPU-bound"
    row["path"] = steps.last_path()
    reference = forward()[0].copy_to_host()
    row["paths"] = {}
    for mode in ("persistent", "graph", "launches"):
        with steps.forced(mode):
            got = forward()[0].copy_to_host()
            ran = steps.last_path()
            row["paths"][mode] = {"ran": ran, "ms": median(forward),
                                  "max_diff": float(np.max(np.abs(got - reference))) if got.size else 0.0}
    if torch:
        first = forward()[0].copy_to_host()
        cudnn = _torch_row(module, params, call, first, repeat, warmup)
        row["cudnn_ms"] = None if cudnn is None else cudnn["median_ms"]
    return row


def timings(modules: Sequence[ModuleType], quick: bool, repeat: int, warmup: int) -> list[dict[str, Any]]:
    """:func:`time_one` for every timed spec among ``modules`` at the issue's shapes (tiny with ``quick``)."""
    shapes = QUICK_SHAPES if quick else {f"{k} {'B{},T{},I{},H{}'.format(*v)}": v for k, v in GPU_SHAPES.items()}
    timed = [m for m in modules if m.NAME in TIMED] or list(modules[:1])
    return [time_one(m, label, shape, repeat, warmup) for m in timed for label, shape in shapes.items()]


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["| spec | shape | input GEMM ms | step loop ms | forward ms | call ms | host launch ms | bound "
            "| cuDNN ms | auto path | persistent ms | graph ms | launches ms |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    lines = head
    for r in rows:
        ms = [_ms(r.get(k)) for k in ("input_gemm_ms", "step_loop_ms", "forward_ms", "call_ms", "host_launch_ms")]
        paths = [_path(r.get("paths", {}).get(mode), mode) for mode in ("persistent", "graph", "launches")]
        lines.append(f"| {r['spec']} | {r['shape']} | {' | '.join(ms)} | {r['bound']} | {_ms(r.get('cudnn_ms'), '')} "
                     f"| {r.get('path') or 'scan'} | {' | '.join(paths)} |")
    return "\n".join(lines)


def _path(found: dict[str, Any] | None, mode: str) -> str:
    """A forced path's time, and which path ran where it was not the one forced."""
    if found is None:
        return ""
    ran = found["ran"]
    if ran is None:
        return "scan"
    return _ms(found["ms"]) + ("" if ran == mode else f" (ran {ran})")


def _ms(value: float | None, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.3f}"
