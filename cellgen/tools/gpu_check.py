"""``cellgen gpu-check [--quick] [--json FILE]``: is the CUDA backend right on this GPU, and how fast?

One report (printed, and as JSON): the environment; every shipped spec with ``backend="cuda"`` against
the cpu backend in float32 and float64 at the issue's shape (B16 T64 H768) and at odd sizes (B5 H37),
with ragged lengths (0 and T among them), random initial states, each call made twice (the same
numbers, bit for bit), device-array inputs, parameters and states, and bidirectional; the training
step (``dynamic_rnn_vjp`` + backward) against the cpu backend's; the forward and the inputs'
gradient against ``torch.nn.LSTM`` / ``GRU`` on cuDNN with the same weights (TF32 off) where torch
sees a GPU; float16 / bfloat16 storage against float64 on the rounded values; CUDA-event timings
(:mod:`cellgen.tools.gpu_check_time`); and the issue's targets (:mod:`cellgen.tools.gpu_check_targets`):
forward and training step of basic_lstm and gru_cudnn against cuDNN in float32 and bfloat16, as
ratios beside the targets, with the bfloat16 results against float64. The exit status is 1 on any
mismatch (a target not met is reported, not a failure). ``--quick`` runs the same code at tiny sizes:
with ``NUMBA_ENABLE_CUDASIM=1`` it runs in numba's simulator (a test does, in CI).
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cellgen.backends.cuda import runtime as rtc
from cellgen.tools import gpu_check_targets, gpu_check_time, gpu_check_torch
from cellgen.tools.gpu_check_cases import DTYPES, QUICK_SHAPES, SHAPES, run_checks, table


def environment() -> dict[str, Any]:
    """The GPU, driver, clocks and the versions of numba-cuda, NumPy, torch and cuDNN."""
    import numba

    cuda = rtc.numba_cuda()
    env: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                           "simulator": rtc.simulated()}
    try:
        from importlib.metadata import version

        env["numba-cuda"] = version("numba-cuda")
    except Exception:  # a missing distribution name is not an error of the check
        env["numba-cuda"] = "unknown"
    if rtc.simulated():
        env["gpu"] = "numba CUDA simulator (no GPU)"
    else:
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        env.update({"gpu": name, "compute_capability": ".".join(map(str, device.compute_capability)),
                    "multiprocessors": _attribute(device, "MULTIPROCESSOR_COUNT"),
                    "sm_clock_mhz": _attribute(device, "CLOCK_RATE", 1e-3),
                    "memory_clock_mhz": _attribute(device, "MEMORY_CLOCK_RATE", 1e-3), "driver": _driver()})
    try:
        import torch

        env.update({"torch": torch.__version__, "torch_cuda": bool(torch.cuda.is_available()),
                    "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None})
    except ImportError:
        env["torch"] = None
    return env


def _attribute(device, name: str, scale: float = 1.0) -> float | str:
    """A CUDA device attribute (``CU_DEVICE_ATTRIBUTE_<name>``), scaled; "unavailable" where numba has none."""
    try:
        return getattr(device, name) * scale
    except Exception:  # an attribute this numba-cuda does not know is not a failed check
        return "unavailable"


def _driver() -> str:
    try:
        from numba.cuda.cudadrv.driver import driver

        return ".".join(map(str, driver.get_version()))
    except Exception:
        return "unavailable"


def main(args: argparse.Namespace) -> int:
    """Run the whole check; 1 on any mismatch."""
    import cellgen
    from cellgen.resources import shipped_specs

    names = list(shipped_specs()) if not args.specs else [s.strip() for s in args.specs.split(",") if s.strip()]
    unknown = sorted(set(names) - set(shipped_specs()))
    if unknown:
        raise ValueError(f"--specs: unknown spec(s) {', '.join(unknown)}; shipped: {', '.join(shipped_specs())}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not set(dtypes) <= set(DTYPES):
        raise ValueError(f"--dtypes: expected some of {', '.join(DTYPES)}, got {args.dtypes!r}")
    env = environment()
    print("## Environment\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")
    modules = [cellgen.load(name) for name in names]
    print("## Correctness (cuda vs cpu)")
    checks = run_checks(modules, dtypes, QUICK_SHAPES if args.quick else SHAPES)
    checks += gpu_check_torch.torch_checks(cellgen.load, args.quick)
    print("\n" + table(checks) + "\n")
    timings = gpu_check_time.timings(modules, args.quick, args.repeat, args.warmup)
    print("## Timings (CUDA events, median of the timed calls after warm-up)\n\n" + gpu_check_time.table(timings))
    print("\n## Targets (against cuDNN, same weights)")
    target_checks, targets = gpu_check_targets.targets(cellgen.load, names, dtypes, args.quick, args.repeat,
                                                                args.warmup)
    print("\n" + gpu_check_targets.table(targets) + "\n\n" + table(target_checks))
    checks += target_checks
    failed = [c for c in checks if c.status == "MISMATCH"]
    print(f"\n{len(failed)} mismatch(es) in {sum(c.status in ('ok', 'MISMATCH') for c in checks)} checks")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "checks": [asdict(c) for c in checks],
                                               "timings": timings, "targets": targets,
                                               "ok": not failed}, indent=2, default=str))
    return 1 if failed else 0


def register(subparsers) -> None:
    """Add ``cellgen gpu-check`` to the CLI."""
    p = subparsers.add_parser("gpu-check", help="the CUDA backend on this GPU: correctness against the cpu backend "
                                                "and cuDNN, CUDA-event timings; exit 1 on a mismatch")
    p.add_argument("--quick", action="store_true", help="tiny sizes (with NUMBA_ENABLE_CUDASIM=1: the simulator)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--specs", metavar="NAMES", help="comma-separated shipped specs (default: all)")
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help="comma-separated: float32, float64, float16, bfloat16 (default all; the half ones forward "
                        "only, against float64)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per figure, the median reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.set_defaults(fn=main)
