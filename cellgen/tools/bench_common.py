"""What the bench's modes share: results, timing blocks, the spec set-up and the torch worker jobs.

:mod:`cellgen.tools.bench` (the command and its forward and training tables) and
:mod:`cellgen.tools.bench_torch_layer` (``--torch-layer``) both build on it; it imports neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Sizes and hyperparameters of a spec in the bench (both modes; other specs: every extra size = H).
#: lstm: a 128 projection (never above H) and both clips on, the issue's configuration.
BENCH_SIZES: dict[str, Callable[[int], dict[str, int]]] = {"lstm": lambda h: {"num_proj": min(128, h)}}
BENCH_HYPER: dict[str, dict[str, float]] = {"lstm": {"cell_clip": 3.0, "proj_clip": 3.0}}


@dataclass
class Result:
    spec: str
    shape: str
    sizes: tuple[int, int, int, int]
    times: dict[str, dict[str, float]] = field(default_factory=dict)  # impl -> best/median seconds
    notes: dict[str, object] = field(default_factory=dict)

    def ratio(self, a: str, b: str, key: str = "best") -> float | None:
        if a in self.times and b in self.times:
            return self.times[a][key] / self.times[b][key]
        return None


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            print(f"\r{line:<100}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def environment() -> dict[str, object]:
    """Thread counts, threading layer, BLAS libraries (and the kernel each runs), CPU vector width."""
    import numba
    from threadpoolctl import threadpool_info

    from cellgen.backends.cpu import gemm

    blas = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
            | {"library": Path(lib["filepath"]).name} for lib in threadpool_info()]
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "(not started)"
    env = {k: os.environ[k] for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NUMBA_THREADING_LAYER")
           if k in os.environ}
    return {"numba": numba.__version__, "numpy": np.__version__, "numba_threads": numba.get_num_threads(),
            "threading_layer": layer, "cpu_count": os.cpu_count(), "gemm_lanes_float32": gemm.LANES32,
            "blas": blas, "env": env}


def timed_blocks(fns: dict[str, Callable[[], object]], repeat: int, warmup: int,
                 limits: dict[str, int] | None = None, pause: float = 0.3) -> dict[str, dict[str, float]]:
    """Each callable in a block of its own (warm-up, then ``repeat`` timed calls); best and median s.

    Blocks, not round-robin: a BLAS call leaves OpenBLAS's threads spinning for a while after
    it returns, and they would steal the cores from the next implementation's threads. The
    ``pause`` between blocks lets them go to sleep.
    """
    limits = limits or {}
    out = {}
    for name, fn in fns.items():
        time.sleep(pause)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(limits.get(name, repeat)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"best": min(times), "median": float(np.median(times))}
    return out


def merge_rounds(rounds: list[Result]) -> Result:
    """One spec and shape measured in several rounds (each a pass over every spec and shape):
    per implementation the best of all rounds and the median of the round medians. A
    neighbour's load on a shared machine hits some blocks of some rounds, not all of them."""
    merged = Result(rounds[0].spec, rounds[0].shape, rounds[0].sizes, notes=dict(rounds[0].notes))
    for impl in rounds[0].times:
        runs = [r.times[impl] for r in rounds if impl in r.times]
        merged.times[impl] = {"best": min(t["best"] for t in runs),
                              "median": float(np.median([t["median"] for t in runs]))}
    if len(rounds) > 1:
        merged.notes["rounds_best"] = {impl: [r.times[impl]["best"] for r in rounds if impl in r.times]
                                       for impl in rounds[0].times}
    return merged


def load_module(spec_path: str):
    """A spec's generated module: :func:`cellgen.load` (the shipped module, or a build in its cache)."""
    import cellgen

    return cellgen.load(spec_path)


def torch_forward_job(module, params, inputs, expected, num_units: int, args) -> dict[str, object] | None:
    """torch.nn.LSTM/GRU for the specs it implements, in a subprocess; None if unavailable."""
    from cellgen.tools.bench_torch import TORCH_CELLS

    kind = TORCH_CELLS.get(module.NAME)
    if kind is None or args.no_torch:
        return None
    return _torch_job(args, kind=kind, threads=args.threads, repeat=args.repeat, warmup=args.warmup, inputs=inputs,
                      expected=expected, num_units=num_units, forget_bias=module.HYPER.get("forget_bias", 0.0),
                      **{f"param:{k}": v for k, v in params.items()})


def add_torch_times(result, torch_job: dict | None) -> None:
    """A torch job's timings (when it ran) into ``result.times["torch"]``, its other fields into the notes."""
    if torch_job is not None and "error" not in torch_job:
        result.times["torch"] = {"best": torch_job.pop("best"), "median": torch_job.pop("median")}
    if torch_job is not None:
        result.notes["torch"] = torch_job


def torch_train_job(module, params, inputs, hyper, expected, grads, num_units: int,
                       args) -> dict[str, object] | None:
    """A torch training step (nn.LSTM/GRU, or an eager loop for lstm/qrnn) in a subprocess."""
    from cellgen.tools.bench_torch import EAGER_CELLS, TORCH_CELLS

    kind = TORCH_CELLS.get(module.NAME) or EAGER_CELLS.get(module.NAME)
    if kind is None or args.no_torch:
        return None
    hyper = {**module.HYPER, **hyper}
    return _torch_job(args, train=True, kind=kind, threads=args.threads, repeat=args.repeat, warmup=args.warmup,
                      inputs=inputs, expected=expected, expected_d_inputs=grads.inputs, num_units=num_units,
                      **{f"param:{k}": v for k, v in params.items()},
                      **{f"grad:{k}": v for k, v in grads.params.items()},
                      **{f"hyper:{k}": float(v) for k, v in hyper.items()})


def _torch_job(args, **arrays) -> dict[str, object]:
    """Run :mod:`cellgen.tools.bench_torch` on a job file of ``arrays``; its JSON line, or an error."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.npz"
        np.savez(job, **arrays)
        proc = subprocess.run([sys.executable, "-m", "cellgen.tools.bench_torch", str(job)], capture_output=True,
                              text=True, env=_child_env(args.threads))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["torch worker failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    return env


def setup_spec(spec_path: str, shape: tuple[int, int, int, int]):
    """A spec's module and fused plan, float32 parameters and inputs, hyperparameters and sizes."""
    from cellgen.build import compile_spec

    module = load_module(spec_path)
    _, plan = compile_spec(spec_path)
    batch, max_time, input_size, num_units = shape
    extra = {s: num_units for s in module.SIZES} | BENCH_SIZES.get(module.NAME, lambda h: {})(num_units)
    params = module.init_params(input_size, num_units, dtype=np.float32, seed=0, **extra)
    inputs = np.random.default_rng(1).standard_normal((batch, max_time, input_size)).astype(np.float32)
    hyper = dict(BENCH_HYPER.get(module.NAME, {}))
    return module, plan, params, inputs, hyper, {"input_size": input_size, "num_units": num_units, **extra}


def ms_cell(result: Result, impl: str) -> str:
    t = result.times.get(impl)
    return f"{t['best'] * 1e3:8.2f} ({t['median'] * 1e3:7.2f})" if t else f"{'-':>18}"


def ratio_cell(value: float | None) -> str:
    return f"{value:6.2f}x" if value is not None else f"{'-':>7}"
