"""`cellgen run SPEC`: load one spec's module (cellgen.load: built into the cache when needed) and run it on
random data (the main job)."""

from __future__ import annotations

import argparse
import time

import numpy as np


def run_spec(spec_path: str, batch: int, max_time: int, input_size: int, num_units: int, seed: int = 0) -> str:
    """Load (build when needed, :func:`cellgen.load`) and run ``dynamic_rnn`` on cpu and reference;
    report shapes, time and agreement. ``spec_path`` may also be a shipped cell's name."""
    import cellgen

    module = cellgen.load(spec_path)
    extra = {s: num_units for s in module.SIZES}
    params = module.init_params(input_size, num_units, seed=seed, **extra)
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((batch, max_time, input_size)).astype(np.float32)
    lengths = rng.integers(0, max_time + 1, size=batch)
    start = time.perf_counter()
    out, state = module.dynamic_rnn(params, inputs, sequence_length=lengths)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out, state = module.dynamic_rnn(params, inputs, sequence_length=lengths)
    second = time.perf_counter() - start
    ref, ref_state = module.dynamic_rnn(params, inputs, sequence_length=lengths, backend="reference")
    err = max(float(np.abs(out - ref).max(initial=0)),
              *(float(np.abs(a - b).max(initial=0)) for a, b in zip(state, ref_state, strict=True)))
    lines = [
        f"loaded {module.NAME} from {spec_path}: {module.__file__}",
        f"dynamic_rnn(batch={batch}, time={max_time}, input_size={input_size}, num_units={num_units}, "
        f"ragged sequence_length) on cpu:",
        f"  outputs {out.shape} {out.dtype}; state " + ", ".join(f"{k} {v.shape}" for k, v in state._asdict().items()),
        f"  first call (JIT compile or cache load) {first * 1e3:.1f} ms, second call {second * 1e3:.2f} ms",
        f"  max |cpu - reference| = {err:.2e} (float32)",
    ]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="build a spec (or load a shipped cell by name) and run dynamic_rnn on random data")
    p.add_argument("spec")
    p.add_argument("--shape", default="8,50,32,64", help="B,T,I,H (default 8,50,32,64)")
    p.set_defaults(fn=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        b, t, i, h = (int(v) for v in args.shape.split(","))
    except ValueError:
        raise SystemExit(f"cellgen: --shape expects B,T,I,H, got {args.shape!r}") from None
    print(run_spec(args.spec, b, t, i, h))
    return 0
