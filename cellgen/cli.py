"""The ``cellgen`` command: build | show | check (and run, bench, inspect, gpu-check where installed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellgen.frontend.spec import SpecError


def _cmd_build(args: argparse.Namespace) -> int:
    from cellgen.build import build, default_out_dir, display_path, stale_report

    out_dir = Path(args.out) if args.out else default_out_dir()
    if args.check:
        old = stale_report(args.specs, out_dir, args.timeout)
        for target, why in old:
            fix = why if why not in ("missing", "differs") else f"{why}: run `cellgen build {' '.join(args.specs)}`"
            print(f"stale: {display_path(target)} ({fix})", file=sys.stderr)
        if not old:
            print("generated files are fresh")
        return 1 if old else 0
    for result in build(args.specs, out_dir, args.timeout):
        state = "wrote" if result.changed else "unchanged"
        print(f"{state} {display_path(result.target)}  <-  {display_path(result.spec_path)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from cellgen.build import compile_spec
    from cellgen.ir.backward import training_plan
    from cellgen.tools.show import describe, describe_training

    for path in args.specs:
        spec, plan = compile_spec(path, args.timeout)
        print(describe(plan, batch=args.batch, sizes=_sizes(args.size)))
        print(describe_training(training_plan(spec), batch=args.batch, sizes=_sizes(args.size)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from cellgen.build import compile_spec, spec_files

    for path in spec_files(args.specs):
        spec, plan = compile_spec(path, args.timeout)
        print(f"ok {path}: {spec.name}, {len(plan.gemms)} recurrent GEMM(s), {len(plan.epilogues)} epilogue(s)")
    return 0


def _sizes(items: list[str] | None) -> dict[str, int]:
    sizes = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise SystemExit(f"cellgen: --size expects NAME=INT, got {item!r}")
        sizes[name] = int(value)
    return sizes


def _add_timeout(p: argparse.ArgumentParser) -> None:
    from cellgen.frontend.spec import DEFAULT_TIMEOUT

    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"stop a spec file that runs longer (default {DEFAULT_TIMEOUT:g}; 0 = no limit)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellgen", description="Compile RNN cell specs into fused Numba kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate ./generated/<name>.py for each spec (or every spec in a folder)")
    b.add_argument("specs", nargs="+")
    b.add_argument("--out", metavar="DIR",
                   help="output folder (default: ./generated of the working directory, made a package)")
    b.add_argument("--check", action="store_true",
                   help="fail if a generated file is missing or stale, or its spec is gone")
    _add_timeout(b)
    b.set_defaults(fn=_cmd_build)
    s = sub.add_parser("show", help="print the fused plan (stages, weights, hoisting, epilogues, FLOPs) "
                                    "and its training plan")
    s.add_argument("specs", nargs="+")
    s.add_argument("--batch", type=int, default=64, help="batch size for the FLOP count (default 64)")
    s.add_argument("--size", action="append", metavar="NAME=INT",
                   help="sizes for the FLOP count (default input_size=num_units=256, extras=num_units)")
    _add_timeout(s)
    s.set_defaults(fn=_cmd_show)
    c = sub.add_parser("check", help="validate specs without writing anything")
    c.add_argument("specs", nargs="+")
    _add_timeout(c)
    c.set_defaults(fn=_cmd_check)
    for extra in ("cellgen.tools.demo", "cellgen.tools.bench", "cellgen.tools.sass", "cellgen.tools.gpu_check"):
        try:
            module = __import__(extra, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except SpecError as err:
        print(f"cellgen: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"cellgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
