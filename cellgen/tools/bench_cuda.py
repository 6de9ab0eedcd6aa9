"""`cellgen bench --backend cuda`: time the generated CUDA kernels, and torch's cuDNN RNNs beside them.

The cellgen figure is the steady-state forward pass: weights packed and uploaded once, inputs
already on the device, ``_cuda_forward`` (hoisted GEMM + T step launches) timed with CUDA
events and synchronised. torch (``torch.nn.LSTM``/``GRU`` under ``torch.no_grad()``, cuDNN)
is timed the same way when torch sees a GPU: with cellgen's weights where the equations are
the same (:data:`cellgen.tools.bench_torch.TORCH_CELLS`, and the largest output difference is
reported), otherwise as the nearest cuDNN cell of the same size (timing only). QRNN has no
torch counterpart.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cellgen.tools.bench_torch import TORCH_CELLS, torch_rnn
from cellgen.backends.cuda import runtime as rtc
from cellgen.backends.cuda import steps as cuda_steps

#: The issue's GPU shapes: (B, T, I, H).
GPU_SHAPES = {"G1": (64, 100, 256, 256), "G2": (16, 1024, 768, 768)}
#: cellgen cell -> the cuDNN cell timed beside it.
TORCH_NEAREST = {"basic_lstm": "LSTM", "lstm": "LSTM", "gru": "GRU", "gru_cudnn": "GRU", "basic_rnn": "RNN"}


def _event_times(fn, repeat: int, warmup: int, event, elapsed) -> dict[str, float]:
    """Best and median milliseconds of ``fn`` between two recorded, synchronised events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = event(), event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return {"best_ms": float(min(times)), "median_ms": float(np.median(times))}


def _cellgen_case(module: ModuleType, batch: int, steps: int, isize: int, units: int, seed: int):
    """Parameters, the device call and a zero-argument forward for one shape (float32).

    The kernels update the recurrent states in place, so every forward starts from its own
    device copy of the call's initial states (a device-to-device copy of B x state size, as a
    real call makes): each timed run computes the same thing. :func:`bench_cuda` compares the
    output of a call made before the timed runs, on the fresh inputs and states.
    """
    sizes = {name: units for name in module.SIZES}
    params = module.init_params(isize, units, dtype=np.float32, seed=seed, **sizes)
    inputs = np.random.default_rng(seed).standard_normal((steps, batch, isize)).astype(np.float32)
    call = rtc.DEVICE.prepare(module._CELL, params, rtc.as_device(inputs), None, None, True, {})
    weights = rtc.upload_weights(module._CELL.pack(call.params, call.sizes), call.params, module._CUDA_GATES,
                                 module._CUDA_UNIT_PARAMS)
    initial = tuple(call.states)

    def forward():
        states = [rtc.copy(s) for s in initial]
        return module._cuda_forward(weights, call.xs, call.lengths, states, call.hyper, call.sizes)

    return params, call, forward


def _torch_row(module: ModuleType, params, call, out, repeat: int, warmup: int) -> dict[str, Any] | None:
    """torch's cuDNN cell on the same device inputs; None without torch or a GPU it can see."""
    kind = TORCH_NEAREST.get(module.NAME)
    try:
        import torch
    except ImportError:
        return None
    if kind is None or not torch.cuda.is_available():
        return None
    steps, batch, isize = call.xs.shape
    units = call.sizes["num_units"]
    same = TORCH_CELLS.get(module.NAME) == kind
    if same:
        net = torch_rnn(torch, kind, params, isize, units, float(module.HYPER.get("forget_bias", 0.0)))
    else:
        net = getattr(torch.nn, kind)(isize, units)
    net = net.cuda().eval()
    with torch.no_grad():
        xs = torch.as_tensor(call.xs, device="cuda")  # zero-copy through __cuda_array_interface__
        times = _event_times(lambda: net(xs), repeat, warmup, lambda: torch.cuda.Event(enable_timing=True),
                             lambda a, b: a.elapsed_time(b))
        row: dict[str, Any] = {"impl": f"torch {kind} (cuDNN)", "same_weights": same, **times,
                               "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
        if same:
            row["max_abs_diff"] = float(np.abs(net(xs)[0].cpu().numpy() - out).max(initial=0.0))
    return row


def bench_cuda(modules: Sequence[ModuleType], shapes: Sequence[tuple[str, tuple[int, int, int, int]]],
               repeat: int, warmup: int = 2, torch: bool = True) -> list[dict[str, Any]]:
    """Time every generated module at every (label, (B, T, I, H)) shape on the GPU, float32.

    One row per (module, shape, implementation): ``cell``, ``shape``, ``B``, ``T``, ``I``, ``H``,
    ``impl`` ("cellgen cuda" or "torch LSTM (cuDNN)"...), ``best_ms``, ``median_ms`` and, for
    torch with the same weights, ``max_abs_diff``. Raises CudaUnavailable without a GPU.
    """
    cuda = rtc.numba_cuda()
    device = "simulator" if rtc.simulated() else cuda.get_current_device().name
    device = device.decode() if isinstance(device, bytes) else str(device)
    rows = []
    for module in modules:
        for label, (batch, steps, isize, units) in shapes:
            params, call, forward = _cellgen_case(module, batch, steps, isize, units, seed=0)
            base = {"cell": module.NAME, "shape": label, "B": batch, "T": steps, "I": isize, "H": units,
                    "device": device}
            cuda_steps.forget()
            first = forward()[0].copy_to_host()  # compared with torch: a call on the fresh inputs and states
            loop = cuda_steps.last_path() or "scan"  # persistent, graph or launches (cellgen.backends.cuda.steps)
            times = _event_times(forward, repeat, warmup, cuda.event, lambda a, b: a.elapsed_time(b))
            rows.append({**base, "impl": "cellgen cuda", "step_loop": loop, **times})
            if torch:
                row = _torch_row(module, params, call, first, repeat, warmup)
                if row is not None:
                    rows.append({**base, **row})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`bench_cuda`'s rows."""
    lines = ["| cell | shape (B,T,I,H) | impl | best ms | median ms | max abs diff |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        impl = r["impl"] + (f" ({r['step_loop']})" if "step_loop" in r else "")
        lines.append(f"| {r['cell']} | {r['shape']} ({r['B']},{r['T']},{r['I']},{r['H']}) | {impl} | "
                     f"{r['best_ms']:.3f} | {r['median_ms']:.3f} | {diff} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``cellgen bench --backend cuda SPEC...`` (called by :mod:`cellgen.tools.bench`)."""
    import cellgen

    shapes = args.shape or list(GPU_SHAPES.items())
    modules = [cellgen.load(spec) for spec in args.specs]
    rows = bench_cuda(modules, shapes, args.repeat, args.warmup, torch=not args.no_torch)
    print(f"device: {rows[0]['device'] if rows else 'none'}")
    print(table(rows))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps({"backend": "cuda", "rows": rows}, indent=2))
    return 0
