"""``cellgen inspect --cuda``: compile every generated CUDA kernel to PTX and link it to SASS, no GPU needed.

numba-cuda's NVVM makes the PTX (``numba.cuda.compile_ptx``) and nvJitLink (from the
``numba-cuda[cu13]`` wheels) links it for ``sm_80`` / ``sm_90``; its verbose log gives
registers per thread, spill bytes and shared memory. The theoretical occupancy follows
from those and the kernel's block size with each architecture's per-SM limits; ``--mix`` adds
the SASS instruction mix (:mod:`cellgen.tools.sass_mix`).

Every generated module's own kernels (``_CUDA_SOURCES``), and once the runtime's kernels the
modules launch (``_CUDA_RUNTIME``: the hoisted GEMM of :mod:`cellgen.backends.cuda.gemm`, SIMT per
dtype, and its tensor-core kernels for float16 / bfloat16 storage, once each), reported under the
cell name ``runtime``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import sys
import tempfile
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

from cellgen.tools.sass_mix import Mix, disassemble, instruction_mix

#: Per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table).
ARCHS = {
    "sm_80": {"cc": (8, 0), "threads": 2048, "blocks": 32, "registers": 65536, "smem": 167936},
    "sm_90": {"cc": (9, 0), "threads": 2048, "blocks": 32, "registers": 65536, "smem": 233472},
}
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
RESERVED_SMEM = 1024  # shared memory the driver reserves per block on sm_80 and later


@dataclass(frozen=True)
class KernelReport:
    """One kernel compiled for one dtype and architecture."""

    cell: str
    kernel: str
    dtype: str
    arch: str
    block: tuple[int, ...]
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int  # static shared memory per block, bytes (the occupancy adds RESERVED_SMEM)
    occupancy: float
    mix: Mix | None = None  # the SASS instruction mix (``--mix``)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def occupancy(arch: str, threads: int, registers: int, smem: int) -> float:
    """Theoretical occupancy (resident warps / max warps per SM) of a block of ``threads``.

    >>> occupancy("sm_90", 128, 32, 0)
    1.0
    >>> round(occupancy("sm_80", 256, 128, 0), 3)
    0.25
    """
    limits = ARCHS[arch]
    max_warps = limits["threads"] // 32
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_regs = (limits["registers"] // per_warp) // warps if per_warp else limits["blocks"]
    by_smem = limits["smem"] // (smem + RESERVED_SMEM)
    blocks = min(limits["blocks"], max_warps // warps, by_regs, by_smem)
    return blocks * warps / max_warps


def link_info(ptx: str, arch: str, name: str) -> dict[str, int]:
    """Link PTX to SASS with nvJitLink; registers, spills and stack from its log, static shared memory
    from the PTX's ``.shared`` declarations (the log's figure includes the reservation on some archs)."""
    from cuda.bindings import nvjitlink

    cooperative = "cudaCGSynchronize" in ptx  # a grid barrier: its device runtime is linked as numba links it
    handle = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), name)
        if cooperative:
            from numba.cuda.cudadrv.libs import get_cudalib

            nvjitlink.add_file(handle, nvjitlink.InputType.LIBRARY, get_cudalib("cudadevrt", static=True))
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")
    info = parse_log(text)
    if cooperative:  # the linked entry's figures: its stack includes the frame of the grid barrier's call
        info.update(parse_linked(text, ptx))
    info["smem"] = sum(int(n) for n in re.findall(r"\.shared\s+\.align\s+\d+\s+\.b8\s+\S+\[(\d+)\]", ptx))
    return info


def parse_linked(log: str, ptx: str) -> dict[str, int]:
    """Registers and stack of the PTX's entry function after linking (nvJitLink's ``Function properties`` line
    for it; the device runtime's own functions have lines of their own)."""
    entry = re.search(r"\.entry\s+(\S+)\s*\(", ptx)
    found = entry and re.search(re.escape(entry.group(1)) + r"':\s*\n?.*?used (\d+) registers.*?(\d+) stack", log)
    if not found:
        raise ValueError(f"nvJitLink log has no linked figures for the entry:\n{log}")
    return {"registers": max(int(found.group(1)), 0), "stack": int(found.group(2))}


def parse_log(log: str) -> dict[str, int]:
    """The numbers of one entry function in an nvJitLink/ptxas ``-verbose`` log."""

    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        if found is None:
            raise ValueError(f"nvJitLink log has no {pattern!r}:\n{log}")
        return int(found.group(1))

    return {
        "registers": grab(r"[Uu]sed (\d+) registers"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


#: The storage dtypes a kernel variant can be compiled for (float16 / bfloat16: float32 arithmetic).
DTYPES = ("float32", "float64", "float16", "bfloat16")


def signature(kinds, dtype: str, storage_args: tuple[str, ...] = ()):
    """Numba types of a kernel's arguments as the runtime passes them (C-contiguous arrays). For a half
    ``dtype`` the arguments named in ``storage_args`` hold it (bfloat16: uint16 patterns), the rest float32."""
    from numba import types

    from cellgen.backends.cuda import precision

    real = getattr(types, precision.compute_name(dtype))
    stored = types.uint16 if dtype == "bfloat16" else getattr(types, dtype)
    table = {"int": types.int64, "real": real, "lengths": types.Array(types.int64, 1, "C"),
             "bits1": types.Array(types.uint16, 1, "C")}  # half storage as 16-bit patterns, flat

    def array(name: str, kind: str):
        held = stored if dtype in precision.HALF and name in storage_args else real
        return types.Array(held, int(kind[-1]), "C")

    return tuple(table[k] if k in table else array(name, k) for name, k in kinds)


def load_generated(spec_path: str | Path, workdir: Path) -> ModuleType:
    """Generate the spec's module as it builds now (into ``workdir``) and import it."""
    from cellgen.build import generate

    name, text = generate(spec_path)
    target = workdir / f"{name}.py"
    target.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_cellgen_inspect_{name}", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _compiling_for(cc: tuple[int, int]) -> Iterator[None]:
    """Without a GPU: numba compiles a device-function overload (``cuda.cg.this_grid().sync()``) for the current
    device's compute capability; let it see the one compiled for (``compile_ptx``'s own ``cc``)."""
    from numba.cuda import dispatcher

    before = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = before


def _report(cell: str, kernel: str, fn, kinds, block, dtype: str, arch: str, mix: bool = False,
            storage_args: tuple[str, ...] = (), label: str | None = None) -> KernelReport:
    """Compile one plain kernel function for ``dtype`` and ``arch`` and read its SASS figures (reported
    under the dtype ``label`` where given: a tensor-core GEMM's arguments are typed from float32)."""
    import numpy as np
    from numba import cuda

    with _compiling_for(ARCHS[arch]["cc"]):
        ptx, _ = cuda.compile_ptx(fn, signature(kinds, dtype, storage_args), cc=ARCHS[arch]["cc"])
    info = link_info(ptx, arch, kernel)
    threads = int(np.prod(block))
    return KernelReport(cell, kernel, label or dtype, arch, tuple(block), info["registers"], info["spill_stores"],
                        info["spill_loads"], info["stack"], info["smem"],
                        occupancy(arch, threads, info["registers"], info["smem"]),
                        instruction_mix(disassemble(ptx, arch)) if mix else None)


def inspect_module(module: ModuleType, archs: list[str], dtypes: list[str], mix: bool = False,
                   kernels: set[str] | None = None) -> list[KernelReport]:
    """Compile every CUDA kernel of a generated module (or those named in ``kernels``) for each dtype and
    architecture."""
    from numba import cuda

    module._cuda_bind(cuda, False)  # what _cuda_kernels binds before jitting, without needing a GPU
    return [_report(module.NAME, kernel, fn, module._CUDA_ARGS[kernel], module._CUDA_BLOCKS[kernel], dtype, arch, mix,
                    module._CUDA_STORAGE_ARGS)
            for dtype in dtypes for kernel, fn in module._CUDA_SOURCES[dtype].items()
            if kernels is None or kernel in kernels for arch in archs]


def runtime_kernels() -> dict[str, tuple]:
    """The runtime's kernels by ``_CUDA_RUNTIME`` name: (source for a dtype, argument kinds, block,
    half storage or None). The tensor-core GEMMs (``hoisted_mma_f16`` ...) have one storage each and
    compile once, whatever the dtypes asked for."""
    from cellgen.backends.cuda import gemm

    kernels = {"hoisted": (gemm.source, gemm.ARGS, gemm.BLOCK, None),
               "hoisted_tn": (lambda dtype: gemm.source(dtype, transpose_a=True), gemm.ARGS, gemm.BLOCK, None)}
    for storage, tag in (("float16", "f16"), ("bfloat16", "bf16")):
        for transpose, name in ((False, "hoisted"), (True, "hoisted_tn")):
            kernels[f"{name}_mma_{tag}"] = (lambda dtype, s=storage, t=transpose: gemm.mma_source(s, t),
                                            gemm.MMA_ARGS, gemm.MMA_BLOCK, storage)
    return kernels


def inspect_runtime(names: list[str], archs: list[str], dtypes: list[str], mix: bool = False) -> list[KernelReport]:
    """Compile the runtime's kernels ``names`` (a module's ``_CUDA_RUNTIME``) for each dtype and architecture
    (a half-storage kernel once, under its storage)."""
    from numba import cuda

    from cellgen.backends.cuda import gemm, precision

    gemm.cuda = cuda  # what gemm.kernel binds before jitting
    kernels = runtime_kernels()
    reports = []
    for dtype in dtypes:
        for name in names:
            source, kinds, block, storage = kernels[name]
            if storage and dtype != dtypes[0]:
                continue
            if dtype in precision.HALF and not storage:  # the SIMT GEMM's storage variant; no half backward
                if name == "hoisted":
                    reports += [_report("runtime", name, gemm.source("float32", storage=dtype), kinds, block, dtype,
                                        arch, mix, ("a", "w")) for arch in archs]
                continue
            reports += [_report("runtime", name, source(dtype), kinds, block, "float32" if storage else dtype, arch,
                                mix, label=storage) for arch in archs]
    return reports


def inspect_specs(paths: list[str | Path], archs: list[str], dtypes: list[str], mix: bool = False,
                  kernels: set[str] | None = None, skip_runtime: frozenset[str] = frozenset()) -> list[KernelReport]:
    """:func:`inspect_module` for every spec file (or folder of specs), after the runtime kernels they launch
    (only the kernels named in ``kernels``, e.g. ``{"stage0"}``, when given; none named in ``skip_runtime``:
    a caller that checks those elsewhere)."""
    from cellgen.build import spec_files

    with tempfile.TemporaryDirectory(prefix="cellgen-inspect-") as tmp:
        modules = [load_generated(p, Path(tmp)) for p in spec_files(list(paths))]
        runtime = [name for name in dict.fromkeys(name for m in modules for name in m._CUDA_RUNTIME)
                   if (kernels is None or name in kernels) and name not in skip_runtime]
        return inspect_runtime(runtime, archs, dtypes, mix) + [
            r for m in modules for r in inspect_module(m, archs, dtypes, mix, kernels)]


def table(reports: list[KernelReport]) -> str:
    """A Markdown table, one row per kernel x dtype x arch (with the instruction mix where it was taken)."""
    mixed = any(r.mix for r in reports)
    head = ["| cell | kernel | dtype | arch | block | regs/thread | spill bytes (st/ld) | stack | smem/block "
            "| occupancy |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    if mixed:
        head = [head[0] + " SASS instrs | LDG | STS | LDS | FMA | HMMA | int ALU | LDG run | instrs/load |",
                head[1] + "---:|" * 9]
    lines = head
    for r in reports:
        line = (f"| {r.cell} | {r.kernel} | {r.dtype} | {r.arch} | {'x'.join(map(str, r.block))} | "
                f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.stack} | {r.smem} | {r.occupancy:.0%} |")
        if mixed and r.mix:
            m = r.mix
            line += (f" {m.instructions} | {m.ldg} | {m.sts} | {m.lds} | {m.fma} | {m.hmma} | {m.integer} | "
                     f"{m.ldg_run} | {m.per_load} |")
        lines.append(line)
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    unknown = [a for a in archs if a not in ARCHS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown arch/dtype {', '.join(unknown)}; archs: {', '.join(ARCHS)}; "
                         f"dtypes: {', '.join(DTYPES)}")
    kernels = {k.strip() for k in args.kernels.split(",") if k.strip()} if args.kernels else None
    reports = inspect_specs(args.specs, archs, dtypes, args.mix, kernels)
    print(table(reports))
    spilled = [r for r in reports if r.spills]
    for r in spilled:
        print(f"spill: {r.cell}.{r.kernel} {r.dtype} {r.arch}: {r.spills} bytes", file=sys.stderr)
    return 1 if spilled else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="compile the generated CUDA kernels to SASS: registers, spills, "
                                              "shared memory, occupancy (no GPU needed)")
    p.add_argument("specs", nargs="+")
    p.add_argument("--cuda", action="store_true", default=True,
                   help="inspect the CUDA kernels (the only target, so the default)")
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated: sm_80, sm_90 (default both)")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated: float32, float64, float16, bfloat16 (default float32; the half ones are "
                        "the storage variants, float32 arithmetic)")
    p.add_argument("--mix", action="store_true",
                   help="add the SASS instruction mix (instructions, LDG, STS, LDS, FMA, integer ALU, global loads "
                        "in flight before a shared store); needs nvdisasm (pip install nvidia-cuda-nvdisasm)")
    p.add_argument("--kernels", metavar="NAMES", help="comma-separated kernel names to inspect (default: all)")
    p.set_defaults(fn=_cmd_inspect)
