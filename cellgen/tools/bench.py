"""`cellgen bench SPEC...`: time forward ``dynamic_rnn`` against its GEMM floors, NumPy and torch.

For each spec and shape, in one process, on the same float32 inputs and after warm-up:

* ``cellgen``        the generated backend (``--backend cpu``; ``cuda`` is delegated to
                     :mod:`cellgen.tools.bench_cuda`);
* ``kernel floor``   only the plan's matrix products, through cellgen's packed GEMM;
* ``BLAS floor``     only the plan's matrix products, through BLAS (the issue's GEMM floor);
* ``reference``      the NumPy reference backend;
* ``torch``          ``torch.nn.LSTM``/``GRU`` with the same weights, timed in a process of
                     its own (:mod:`cellgen.tools.bench_torch`) with the same thread count.

With ``--train`` it times a training step instead (loss = sum(outputs)):

* ``cellgen``        ``dynamic_rnn_vjp`` + ``backward(ones_like(outputs))`` (``--recompute``:
                     ``recompute=True``);
* ``kernel floor``   only the step's GEMMs: the forward's, the reverse loop's transposed
                     recurrent GEMMs (packed micro-kernel, same threads) and the after-loop weight
                     and input GEMMs (NumPy BLAS, as the generated backward);
* ``torch``          forward + ``outputs.sum().backward()`` of ``torch.nn.LSTM``/``GRU`` or, for
                     ``lstm`` and ``qrnn``, of an eager torch loop (:mod:`cellgen.tools.bench_torch`),
                     with the outputs' and gradients' differences from cellgen's;

and, for where the time goes, cellgen's plain forward, its forward that saves (the vjp call
alone) and each part of the floor.

Each implementation is timed in a block of its own after a short pause (BLAS thread pools
keep spinning after a call and would steal the cores from the next one); best and median
are reported, so compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cellgen import backends
from cellgen.tools.bench_common import (
    Progress,
    Result,
    add_torch_times,
    environment,
    load_module,
    merge_rounds,
    ms_cell,
    ratio_cell,
    setup_spec,
    timed_blocks,
    torch_forward_job,
    torch_train_job,
)

#: The issue's shapes: (B, T, I, H).
SHAPES = {"S1": (64, 100, 256, 256), "S2": (16, 200, 512, 512), "S3": (1, 1000, 128, 128),
          "S4": (256, 50, 128, 128)}
IMPLS = ("cellgen", "kernel floor", "BLAS floor", "reference", "torch")
#: ``--train``: the table's columns, then the breakdown's (cellgen's forward alone, its forward that
#: saves, and the three parts of the training floor).
TRAIN_IMPLS = ("cellgen", "kernel floor", "torch")
TRAIN_PARTS = ("cellgen fwd", "vjp fwd", "floor fwd", "floor rev loop", "floor after loop")
















def bench_one(spec_path: str, label: str, shape: tuple[int, int, int, int], args, progress: Progress) -> Result:
    """Every implementation on one spec and shape."""
    from cellgen.tools.bench_floor import blas_floor, kernel_floor, products

    module, plan, params, inputs, hyper, sizes = setup_spec(spec_path, shape)
    batch, max_time, input_size, num_units = shape
    result = Result(module.NAME, label, shape, notes={"sizes": sizes, "hyper": hyper})

    start = time.perf_counter()
    expected, _ = module.dynamic_rnn(params, inputs, backend=args.backend, **hyper)
    result.notes["first_call_s"] = time.perf_counter() - start
    prods = products(plan, batch, max_time, sizes)
    fns = {"cellgen": lambda: module.dynamic_rnn(params, inputs, backend=args.backend, **hyper),
           "kernel floor": kernel_floor(prods), "BLAS floor": blas_floor(prods),
           "reference": lambda: module.dynamic_rnn(params, inputs, backend="reference", **hyper)}
    result.times.update(timed_blocks(fns, args.repeat, args.warmup, {"reference": min(args.repeat, 3)}))
    progress.step(f"{module.NAME} {label} in-process")
    add_torch_times(result, torch_forward_job(module, params, inputs, expected, num_units, args))
    progress.step(f"{module.NAME} {label} torch")
    return result




def bench_train_one(spec_path: str, label: str, shape: tuple[int, int, int, int], args,
                    progress: Progress) -> Result:
    """A training step (forward + backward of sum(outputs)) on one spec and shape, every implementation."""
    from cellgen.tools.bench_floor import train_floor, train_floor_parts, train_products

    module, plan, params, inputs, hyper, sizes = setup_spec(spec_path, shape)
    batch, max_time, input_size, num_units = shape
    recompute = bool(args.recompute)
    result = Result(module.NAME, label, shape, notes={"sizes": sizes, "hyper": hyper, "recompute": recompute})

    def step():
        (outputs, _), backward = module.dynamic_rnn_vjp(params, inputs, backend=args.backend, recompute=recompute,
                                                        **hyper)
        return outputs, backward(np.ones_like(outputs))

    start = time.perf_counter()
    expected, grads = step()
    result.notes["first_call_s"] = time.perf_counter() - start
    parts = train_floor_parts(train_products(plan, batch, max_time, sizes))
    fns = {"cellgen": step, "kernel floor": train_floor(parts),
           "cellgen fwd": lambda: module.dynamic_rnn(params, inputs, backend=args.backend, **hyper),
           "vjp fwd": lambda: module.dynamic_rnn_vjp(params, inputs, backend=args.backend, recompute=recompute,
                                                     **hyper),
           "floor fwd": parts["forward"], "floor rev loop": parts["reverse loop"],
           "floor after loop": parts["after loop"]}
    result.times.update(timed_blocks(fns, args.repeat, args.warmup))
    progress.step(f"{module.NAME} {label} in-process (train)")
    add_torch_times(result, torch_train_job(module, params, inputs, hyper, expected, grads, num_units, args))
    progress.step(f"{module.NAME} {label} torch (train)")
    return result


# -- JIT -------------------------------------------------------------------------------------------
_JIT_PROBE = """
import sys, time, importlib.util, json
import numpy as np
start = time.perf_counter()
from cellgen.backends.cpu import gemm, sync
if {runtime_only!r}:
    gemm.compile_shared(np.float32)
    sync.compile_shared()
    print(json.dumps({{"first_call_s": time.perf_counter() - start, "import_s": 0.0}}))
    raise SystemExit
spec = importlib.util.spec_from_file_location("_cellgen_jit_probe", {path!r})
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
imported = time.perf_counter() - start
params = mod.init_params(8, 256, seed=0, **{{s: 256 for s in mod.SIZES}})
x = np.zeros((64, 40, 8), np.float32)  # enough work for the parallel path: it compiles too
start = time.perf_counter()
mod.dynamic_rnn(params, x)
print(json.dumps({{"import_s": imported, "first_call_s": time.perf_counter() - start}}))
"""


def jit_times(spec_path: str) -> dict[str, float]:
    """First-call times in fresh processes sharing one new Numba cache directory.

    ``runtime``: compiling the shared packed-GEMM runtime (once per machine, every spec uses
    it); ``cold``: the spec's kernels with the runtime cached; ``cached``: everything cached.
    """
    module = load_module(spec_path)
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for kind in ("runtime", "cold", "cached"):
            code = _JIT_PROBE.format(path=str(Path(module.__file__).resolve()), runtime_only=kind == "runtime")
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            probe = json.loads(proc.stdout.strip().splitlines()[-1])
            out[f"{kind}_first_call_s"] = probe["first_call_s"]
            out[f"{kind}_import_s"] = probe["import_s"]
    return out


# -- report ----------------------------------------------------------------------------------------




def train_table(results: list[Result]) -> str:
    """``--train``: best (median) ms of a training step, the ratios, torch's differences; then
    where the time goes (cellgen's forward, its saving forward, the backward by difference, and
    the floor's parts)."""
    head = (f"{'spec':<11} {'shape':<5} " + " ".join(f"{n + ' ms':>18}" for n in TRAIN_IMPLS)
            + f"  cg/kern cg/torch  {'torch is':<24} {'d out':>8} {'d dx':>8} {'dW rel':>8}")
    lines = ["training step (forward + backward of sum(outputs)):", head, "-" * len(head)]
    for r in results:
        torch = r.notes.get("torch") if isinstance(r.notes.get("torch"), dict) else {}
        diffs = " ".join(f"{torch[k]:8.1e}" if k in torch else f"{'-':>8}"
                         for k in ("max_abs_diff", "d_inputs_max_abs_diff", "d_params_max_rel_diff"))
        lines.append(f"{r.spec:<11} {r.shape:<5} " + " ".join(ms_cell(r, n) for n in TRAIN_IMPLS) + "  "
                     + " ".join(ratio_cell(r.ratio("cellgen", b)) for b in ("kernel floor", "torch"))
                     + f"  {torch.get('impl', '-'):<24} {diffs}")
    lines.append("times: best (median) of the repeats; ratios from best times; d out / d dx: max abs difference "
                 "of torch's outputs / input gradient from cellgen's; dW rel: of the parameter gradients, relative "
                 "to each one's largest magnitude (the worst parameter).")
    head = (f"{'spec':<11} {'shape':<5} " + " ".join(f"{n + ' ms':>18}" for n in TRAIN_PARTS)
            + f" {'bwd ms':>8} step/fwd")
    lines += ["", "where the time goes (best ms; bwd = step - vjp fwd):", head, "-" * len(head)]
    for r in results:
        bwd = r.times["cellgen"]["best"] - r.times["vjp fwd"]["best"]
        lines.append(f"{r.spec:<11} {r.shape:<5} " + " ".join(ms_cell(r, n) for n in TRAIN_PARTS)
                     + f" {bwd * 1e3:8.2f} " + ratio_cell(r.ratio("cellgen", "cellgen fwd")))
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    """Best (median) ms per implementation and the cellgen ratios, one row per spec and shape."""
    head = (f"{'spec':<11} {'shape':<5} " + " ".join(f"{n + ' ms':>18}" for n in IMPLS)
            + "  cg/kern cg/BLAS  cg/ref cg/torch")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.spec:<11} {r.shape:<5} " + " ".join(ms_cell(r, n) for n in IMPLS) + "  " + " ".join(
            ratio_cell(r.ratio("cellgen", b)) for b in ("kernel floor", "BLAS floor", "reference", "torch")))
    lines.append("times: best (median) of the repeats; ratios from best times; "
                 "cg/ref < 1 means faster than NumPy.")
    return "\n".join(lines)


def plot(results: list[Result], path: str, impls: tuple[str, ...] = IMPLS, what: str = "forward") -> None:
    """A grouped bar chart of best times (log scale) per spec and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.spec}\n{r.shape}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(results)), 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        values = [r.times[impl]["best"] * 1e3 if impl in r.times else 0.0 for r in results]
        ax.bar(np.arange(len(results)) + (k - (len(impls) - 1) / 2) * width, values, width, label=impl)
    ax.set_xticks(np.arange(len(results)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"{what} time, best (ms)")
    ax.set_title(f"cellgen bench (float32 dynamic_rnn {what})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command ---------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[str, tuple[int, int, int, int]]:
    if text.upper() in SHAPES:
        return text.upper(), SHAPES[text.upper()]
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape expects B,T,I,H (positive ints) or S1..S4, got {text!r}")
    dims = tuple(int(p) for p in parts)
    label = next((k for k, v in SHAPES.items() if v == dims), "x".join(parts))
    return label, dims  # type: ignore[return-value]


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.recompute and not args.train:
        print("cellgen bench: --recompute needs --train", file=sys.stderr)
        return 2
    if args.torch_layer and not args.train:
        print("cellgen bench: --torch-layer needs --train", file=sys.stderr)
        return 2
    if args.train and (args.jit or backends.REGISTRY[args.backend].device):
        print("cellgen bench: --train times host backends' training step; --jit and device backends time the "
              "forward (run them without --train)", file=sys.stderr)
        return 2
    if backends.REGISTRY[args.backend].device:
        return _delegate_device(args)
    shapes = args.shape or list(SHAPES.items())
    if args.threads is None:
        import numba

        args.threads = numba.get_num_threads()
    progress = Progress(args.rounds * len(args.specs) * len(shapes) * 2 + (len(args.specs) if args.jit else 0))
    jit = {}
    for spec in args.specs:
        if args.jit:
            jit[spec] = jit_times(spec)
            progress.step(f"{spec} JIT cold/cached")
    one = bench_train_one if args.train else bench_one
    report = train_table if args.train else table
    if args.torch_layer:  # the raw step beside cellgen.torch.RNN's (cellgen.tools.bench_torch_layer)
        from cellgen.tools.bench_torch_layer import bench_layer_one, layer_table

        one, report = bench_layer_one, layer_table
    rounds = [[one(spec, label, shape, args, progress) for spec in args.specs for label, shape in shapes]
              for _ in range(args.rounds)]
    results = [merge_rounds(list(same)) for same in zip(*rounds, strict=True)]
    progress.close()
    env = environment()
    print(_env_text(env, args.threads))
    print(report(results))
    for r in results[:: len(shapes)]:
        print(f"{r.spec}: first call in this process {r.notes['first_call_s']:.2f} s (JIT or on-disk cache)")
    for spec, t in jit.items():
        print(f"{spec}: first call in a new process: JIT {t['cold_first_call_s']:.2f} s "
              f"(+ {t['runtime_first_call_s']:.2f} s once per machine for the shared GEMM runtime), "
              f"from the on-disk cache "
              f"{t['cached_first_call_s']:.2f} s (module import {t['cached_import_s']:.2f} s)")
    for r in results:
        torch = r.notes.get("torch")
        if isinstance(torch, dict) and "error" in torch:
            print(f"torch skipped for {r.spec} {r.shape}: {torch['error']}")
        elif isinstance(torch, dict) and torch.get("max_abs_diff", 0.0) > 1e-4:
            print(f"warning: torch output differs from cellgen by {torch['max_abs_diff']:.2e} ({r.spec} {r.shape})")
        elif isinstance(torch, dict) and torch.get("d_inputs_max_abs_diff", 0.0) > 1e-3 * max(
                1.0, torch.get("d_inputs_max_abs", 0.0)):
            print(f"warning: torch's input gradient differs from cellgen's by {torch['d_inputs_max_abs_diff']:.2e} "
                  f"(largest magnitude {torch['d_inputs_max_abs']:.2e}; {r.spec} {r.shape})")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "mode": "train" if args.train else
                                               "forward", "recompute": bool(args.recompute), "environment": env,
                                               "jit": jit, "results": [asdict(r) for r in results]},
                                              indent=2, default=str))
    if args.plot:
        impls = ("raw vjp", "torch layer", "torch") if args.torch_layer else TRAIN_IMPLS
        plot(results, args.plot, *((impls, "training step") if args.train else ()))
    return 0


def _env_text(env: dict[str, object], threads: int) -> str:
    blas = "; ".join(f"{b['library']} {b['internal_api']} {b['version']} kernel={b['architecture']} "
                     f"threads={b['num_threads']}" for b in env["blas"])  # type: ignore[union-attr]
    return (f"threads: numba {env['numba_threads']} (layer {env['threading_layer']}), torch {threads}; "
            f"cpus {env['cpu_count']}; cellgen GEMM float32 lanes {env['gemm_lanes_float32']}\n"
            f"BLAS: {blas}\nenv: {env['env'] or 'no thread/BLAS variables set'}")


#: The tool that times each backend whose arrays live on a device (``Backend.device``; events on the
#: device); every other registered backend is timed here, in the "cellgen" row.
DEVICE_BENCHES = {"cuda": "cellgen.tools.bench_cuda"}


def _delegate_device(args: argparse.Namespace) -> int:
    tool = DEVICE_BENCHES.get(args.backend)
    if tool is None:
        print(f"cellgen bench: --backend {args.backend} keeps its arrays on a device and has no timing tool "
              f"(cellgen.tools.bench.DEVICE_BENCHES)", file=sys.stderr)
        return 2
    try:
        bench_device = importlib.import_module(tool)
    except ImportError as err:
        print(f"cellgen bench: --backend {args.backend} needs {tool} and its extra ({err})", file=sys.stderr)
        return 2
    try:
        return int(bench_device.main(args) or 0)
    except Exception as err:  # no GPU, no driver, no simulator: say so, fail
        print(f"cellgen bench: {args.backend} backend unavailable: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def register(subparsers) -> None:
    """Add ``cellgen bench`` to the CLI (cellgen.cli imports this module when it exists)."""
    b = subparsers.add_parser("bench", help="time dynamic_rnn against the GEMM floors, NumPy and torch")
    b.add_argument("specs", nargs="+", help="spec files")
    b.add_argument("--backend", choices=backends.names(), default=backends.names()[0],
                   help="the backend timed in the 'cellgen' row (a device backend has its own tool)")
    b.add_argument("--shape", action="append", type=_shape, metavar="B,T,I,H",
                   help="a shape (repeatable) or S1..S4; default: S1 S2 S3 S4")
    b.add_argument("--repeat", type=int, default=10, help="timed calls per implementation (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    b.add_argument("--rounds", type=_positive, default=1,
                   help="passes over every spec and shape; each figure is the best of all passes (default 1)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: Numba's thread count)")
    b.add_argument("--no-torch", action="store_true", help="skip torch even when it is installed")
    b.add_argument("--jit", action="store_true", help="also time the first call in new processes, cold and cached")
    b.add_argument("--train", action="store_true",
                   help="time a training step (dynamic_rnn_vjp + backward of sum(outputs)) instead of the forward")
    b.add_argument("--recompute", action="store_true", help="with --train: dynamic_rnn_vjp(..., recompute=True)")
    b.add_argument("--torch-layer", action="store_true",
                   help="with --train: the raw step beside cellgen.torch.RNN's training step in one process, and torch")
    b.add_argument("--json", help="write every number to this JSON file")
    b.add_argument("--plot", help="write a bar chart PNG (needs matplotlib)")
    b.set_defaults(fn=_cmd_bench)
