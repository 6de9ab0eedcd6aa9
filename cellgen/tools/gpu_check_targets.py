"""``cellgen gpu-check``'s targets: the issue's LSTM and GRU against cuDNN, forward and training step, two dtypes.

For basic_lstm (``torch.nn.LSTM``) and gru_cudnn (``torch.nn.GRU``), with the same weights, at B16 T1024 H768
and B64 T100 H256 (``--quick``: tiny), time-major inputs on the device, full lengths, zero initial states:

* **forward**: ``dynamic_rnn(params, xs, time_major=True, backend="cuda")`` (host parameters: their upload
  cached) against ``net(x)`` under ``torch.no_grad()``;
* **training step**: ``dynamic_rnn_vjp`` + ``backward(ones)`` (the loss ``sum(outputs)``) against
  ``net(x)[0].sum().backward()`` with the inputs and parameters requiring grad (gradients set to None first);

in float32 (TF32 off) and bfloat16 (cellgen: bfloat16 storage, float32 arithmetic; torch: the module and
inputs cast to bfloat16, cuDNN's half path). cellgen's bfloat16 training runs on host arrays
(:mod:`cellgen.runtime.half_train`: the float32 training kernels on the widened values), so its figure
includes the copies. Each figure is the median of ``repeat`` calls after ``warmup``, between two recorded
and synchronised events (CUDA events; wall time in the simulator and for torch on the CPU). The ratio
cellgen / cuDNN is set against the issue's targets (:data:`TARGETS`).

Correctness rows (:class:`~cellgen.tools.gpu_check_cases.Check`): the bfloat16 forward's outputs and final
states, and the bfloat16 training step's inputs gradient, against the cpu backend in float64 on the same
rounded values (error / the half tolerance of :func:`~cellgen.tools.gpu_check_cases.half_fraction`, ok <= 1);
cuDNN's bfloat16 result's error against the same float64 values is in the note (it rounds h to bfloat16 at
every step, cellgen keeps float32 working states: information, not a check).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cellgen.backends.cuda import precision
from cellgen.backends.cuda import runtime as rtc
from cellgen.tools.bench_cuda import _event_times
from cellgen.tools.bench_torch import TORCH_CELLS, torch_rnn
from cellgen.tools.gpu_check_cases import Check, half_fraction, status

SHAPES = {"B16 T1024 H768": (16, 1024, 768, 768), "B64 T100 H256": (64, 100, 256, 256)}
QUICK_SHAPES = {"B2 T3 H4": (2, 3, 4, 4)}
DTYPES = ("float32", "bfloat16")
PHASES = ("forward", "training step")
#: The issue's targets, cellgen / cuDNN at most: (phase, dtype) -> ratio.
TARGETS = {("forward", "float32"): 2.0, ("forward", "bfloat16"): 1.5,
           ("training step", "float32"): 2.0, ("training step", "bfloat16"): 2.0}


class WallEvent:
    """An event with CUDA events' interface that reads the wall clock (synchronous work only)."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: WallEvent) -> float:
        return (end.time - self.time) * 1e3


@dataclass
class Torch:
    """torch on ``device`` ("cuda": cuDNN, CUDA events; "cpu": a stand-in for tests, wall time)."""

    module: Any
    device: str

    def event(self) -> Any:
        return self.module.cuda.Event(enable_timing=True) if self.device == "cuda" else WallEvent()

    def dtype(self, name: str) -> Any:
        return getattr(self.module, name)


def torch_on_gpu() -> tuple[Torch | None, str]:
    """torch with a CUDA device (TF32 off), or None and why not."""
    try:
        import torch
    except ImportError:
        return None, "torch is not importable"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return Torch(torch, "cuda"), ""


def _cellgen_event() -> Callable[[], Any]:
    return WallEvent if rtc.simulated() else rtc.numba_cuda().event


def _median_ms(fn: Callable[[], Any], event: Callable[[], Any], repeat: int, warmup: int) -> float:
    return _event_times(fn, repeat, warmup, event, lambda a, b: a.elapsed_time(b))["median_ms"]


@dataclass
class Problem:
    """One (cell, shape): float32 parameters and time-major inputs whose values are exact in bfloat16."""

    module: ModuleType
    kind: str
    units: int
    params: dict[str, np.ndarray]
    inputs: np.ndarray

    @classmethod
    def make(cls, module: ModuleType, shape: tuple[int, int, int, int]) -> Problem:
        batch, steps, isize, units = shape
        params = module.init_params(isize, units, dtype=np.float32, seed=7)
        inputs = np.random.default_rng(7).standard_normal((steps, batch, isize)).astype(np.float32)
        exact = {k: _through_bfloat16(v) for k, v in params.items()}
        return cls(module, TORCH_CELLS[module.NAME], units, exact, _through_bfloat16(inputs))

    def params_as(self, dtype: str) -> dict[str, np.ndarray]:
        return self.params if dtype == "float32" else {k: _bfloat16(v) for k, v in self.params.items()}

    def device_inputs(self, dtype: str) -> Any:
        cuda = rtc.numba_cuda()
        if dtype == "float32":
            return cuda.to_device(self.inputs)
        return precision.bfloat16_device(cuda.to_device(precision.to_storage(self.inputs, "bfloat16")))


def _through_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 values that bfloat16 holds exactly (so both dtypes compute on the same numbers)."""
    return precision.from_storage(precision.to_storage(a, "bfloat16"), "bfloat16").astype(np.float32)


def _bfloat16(a: np.ndarray) -> np.ndarray:
    return precision.host_bfloat16(precision.to_storage(a, "bfloat16"))


def cellgen_times(p: Problem, dtype: str, repeat: int, warmup: int) -> dict[str, float]:
    """The forward and the training step of cellgen's cuda backend, ms."""
    module, event = p.module, _cellgen_event()
    params, xs = p.params_as(dtype), p.device_inputs(dtype)
    forward = _median_ms(lambda: module.dynamic_rnn(params, xs, time_major=True, backend="cuda"), event, repeat,
                         warmup)
    if dtype == "float32":
        inputs, ones = xs, rtc.numba_cuda().to_device(np.ones(p.inputs.shape[:2] + (p.units,), np.float32))
    else:  # half training takes host arrays
        inputs, ones = _bfloat16(p.inputs), _bfloat16(np.ones(p.inputs.shape[:2] + (p.units,), np.float32))

    def step():
        _, backward = module.dynamic_rnn_vjp(params, inputs, time_major=True, backend="cuda")
        return backward(ones)

    return {"forward": forward, "training step": _median_ms(step, event, repeat, warmup)}


def torch_net(p: Problem, torch: Torch, dtype: str) -> Any:
    """``nn.LSTM`` / ``nn.GRU`` with the problem's weights (TF gate order and forget_bias converted)."""
    net = torch_rnn(torch.module, p.kind, p.params, p.inputs.shape[2], p.units,
                    float(p.module.HYPER.get("forget_bias", 0.0)))
    return net.to(torch.device).to(torch.dtype(dtype))


def torch_times(p: Problem, torch: Torch, dtype: str, repeat: int, warmup: int) -> dict[str, float]:
    """cuDNN's forward (no grad) and training step (forward + backward of the sum), ms."""
    net = torch_net(p, torch, dtype)
    x = torch.module.from_numpy(p.inputs).to(torch.device).to(torch.dtype(dtype))

    def forward():
        with torch.module.no_grad():
            return net(x)

    xg = x.clone().requires_grad_(True)

    def step():
        xg.grad = None
        for w in net.parameters():
            w.grad = None
        net(xg)[0].sum().backward()

    return {"forward": _median_ms(forward, torch.event, repeat, warmup),
            "training step": _median_ms(step, torch.event, repeat, warmup)}


def bfloat16_checks(p: Problem, label: str, torch: Torch | None) -> list[Check]:
    """cellgen's bfloat16 forward and inputs gradient against float64 on the same values; cuDNN's in the note."""
    module = p.module
    wide = {k: v.astype(np.float64) for k, v in p.params.items()}
    x64 = p.inputs.astype(np.float64)
    (want_out, want_state), backward = module.dynamic_rnn_vjp(wide, x64, time_major=True)
    want_grad = backward(np.ones_like(want_out)).inputs
    got_out, got_state = module.dynamic_rnn(p.params_as("bfloat16"), p.device_inputs("bfloat16"), time_major=True,
                                            backend="cuda")
    forward = max(half_fraction(a, b, "bfloat16") for a, b in zip(
        [got_out.copy_to_host(), *(s.copy_to_host() for s in got_state)], [want_out, *want_state], strict=True))
    (out, _), half_backward = module.dynamic_rnn_vjp(p.params_as("bfloat16"), _bfloat16(p.inputs), time_major=True,
                                                     backend="cuda")
    grad = half_fraction(half_backward(_bfloat16(np.ones(out.shape, np.float32))).inputs, want_grad, "bfloat16")
    notes = {"forward": "", "grad": ""}
    if torch is not None:
        net = torch_net(p, torch, "bfloat16")
        x = torch.module.from_numpy(p.inputs).to(torch.device).to(torch.dtype("bfloat16")).requires_grad_(True)
        y = net(x)[0]
        y.sum().backward()
        to_host = lambda t: _bfloat16(t.detach().float().cpu().numpy())  # noqa: E731
        notes["forward"] = f"cuDNN bfloat16: {half_fraction(to_host(y), want_out, 'bfloat16'):.2f} of it (outputs)"
        notes["grad"] = f"cuDNN bfloat16: {half_fraction(to_host(x.grad), want_grad, 'bfloat16'):.2f} of it"
    name = module.NAME
    return [Check("targets", name, "bfloat16", label, "forward vs float64 (error / tolerance)", forward, 1.0,
                  status(forward, 1.0), notes["forward"]),
            Check("targets", name, "bfloat16", label, "training step: inputs gradient vs float64 (error / tolerance)",
                  grad, 1.0, status(grad, 1.0), notes["grad"])]


def targets(load: Callable[[str], ModuleType], specs: Sequence[str], dtypes: Sequence[str], quick: bool,
            repeat: int, warmup: int, torch: Torch | None = None,
            progress: Callable[[str], None] = print) -> tuple[list[Check], list[dict]]:
    """Correctness rows and one timing row per (cell, shape, dtype, phase) for the cells of :data:`TORCH_CELLS`
    among ``specs`` and the dtypes of :data:`DTYPES` among ``dtypes``; torch: :func:`torch_on_gpu`'s by default."""
    why = ""
    if torch is None:
        torch, why = torch_on_gpu()
    checks: list[Check] = []
    rows: list[dict[str, Any]] = []
    for name in (n for n in TORCH_CELLS if n in specs):
        module = load(name)
        for label, shape in (QUICK_SHAPES if quick else SHAPES).items():
            progress(f"  targets: {name} {label}")
            p = Problem.make(module, shape)
            if "bfloat16" in dtypes:
                checks += bfloat16_checks(p, label, torch)
            for dtype in (d for d in DTYPES if d in dtypes):
                ours = cellgen_times(p, dtype, repeat, warmup)
                theirs = torch_times(p, torch, dtype, repeat, warmup) if torch is not None else {}
                for phase in PHASES:
                    rows.append(_row(name, label, dtype, phase, ours[phase], theirs.get(phase), why))
    return checks, rows


def _row(spec: str, shape: str, dtype: str, phase: str, ours: float, cudnn: float | None, why: str) -> dict:
    target = TARGETS[phase, dtype]
    ratio = None if cudnn is None else ours / cudnn
    return {"spec": spec, "shape": shape, "dtype": dtype, "phase": phase, "cellgen_ms": ours, "cudnn_ms": cudnn,
            "ratio": ratio, "target": target, "met": None if ratio is None else bool(ratio <= target),
            "note": why}


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| spec | shape | dtype | phase | cellgen ms | cuDNN ms | cellgen / cuDNN | target | met |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cudnn = "n/a" if r["cudnn_ms"] is None else f"{r['cudnn_ms']:.3f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        met = r["note"] if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['spec']} | {r['shape']} | {r['dtype']} | {r['phase']} | {r['cellgen_ms']:.3f} | {cudnn} "
                     f"| {ratio} | <= {r['target']:g} | {met} |")
    return "\n".join(lines)
