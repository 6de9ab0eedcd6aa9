"""``cellgen inspect --mix``: a kernel's SASS instruction mix, from nvJitLink's cubin and nvdisasm, no GPU needed.

Static counts over the kernel's SASS (each instruction once, however often it runs): all
instructions, global loads (``LDG``), shared stores and loads (``STS``, ``LDS``), tensor-core MMAs
(``HMMA``), FMAs and integer
ALU instructions (index math: ``IMAD``, ``IADD3``, ``LEA``, ``SHF``, ``LOP3``, ``ISETP``, ``SEL``...),
and ``ldg_run``: the most global loads issued, in program order, between two shared stores (loads
after the last store, an epilogue's, do not count), i.e. how many loads a warp can have in flight
when it moves a tile through registers into shared memory (1 where each load is consumed by its
store before the next issues); ``per_load``: instructions per global load of the loop that loads
the tiles (:func:`per_load`).

nvdisasm comes with the CUDA toolkit or the ``nvidia-cuda-nvdisasm`` wheel
(``pip install nvidia-cuda-nvdisasm``); :func:`nvdisasm` finds either.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Integer ALU opcodes (index arithmetic, compares, selects), with or without the uniform-datapath ``U``.
INTEGER = frozenset({"IMAD", "IADD3", "IADD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IMNMX", "VIADD", "VIMNMX",
                     "IABS", "FLO", "POPC", "BMSK", "SGXT", "PRMT", "MOV", "IMUL"})
FMA = frozenset({"FFMA", "DFMA", "HFMA2"})
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LINE = re.compile(r"^(\.L_x_\d+):"  # a label, or an instruction and the label it branches to
                   r"|/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)[^`]*(?:`\((\.L_x_\d+)\))?")


@dataclass(frozen=True)
class Mix:
    """A kernel's static SASS instruction counts (see the module)."""

    instructions: int
    ldg: int
    sts: int
    lds: int
    fma: int
    integer: int
    ldg_run: int
    per_load: float  # instructions per global load of the loop that loads tiles (its inner loops left out)
    hmma: int = 0  # tensor-core MMAs (HMMA: mma.sync on f16 / bf16)


def nvdisasm() -> str:
    """The nvdisasm executable: on PATH, in the CUDA toolkit, or in the ``nvidia-cuda-nvdisasm`` wheel."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    candidates = list(Path("/usr/local").glob("cuda*/bin/nvdisasm"))
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += list(Path(root).glob("*/bin/nvdisasm"))
    except ImportError:
        pass
    if not candidates:
        raise ValueError("--mix needs nvdisasm: pip install nvidia-cuda-nvdisasm (or a CUDA toolkit on PATH)")
    return str(candidates[0])


def cubin(ptx: str, arch: str) -> bytes:
    """Link PTX to a cubin for ``arch`` (``sm_80``, ``sm_90``) with nvJitLink."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(1, [f"-arch={arch}"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        if "cudaCGSynchronize" in ptx:  # a grid barrier: link its device runtime, as numba does
            from numba.cuda.cudadrv.libs import get_cudalib

            nvjitlink.add_file(handle, nvjitlink.InputType.LIBRARY, get_cudalib("cudadevrt", static=True))
        nvjitlink.complete(handle)
        out = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, out)
    finally:
        nvjitlink.destroy(handle)
    return bytes(out)


def disassemble(ptx: str, arch: str) -> str:
    """The SASS of a PTX module for ``arch``, as nvdisasm prints it."""
    with tempfile.TemporaryDirectory(prefix="cellgen-sass-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin(ptx, arch))
        done = subprocess.run([nvdisasm(), "-c", str(path)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise ValueError(f"nvdisasm failed: {done.stderr.strip()}")
    return done.stdout


def opcodes(sass: str) -> list[str]:
    """The opcodes in program order, without their modifiers (``LDG.E.64`` -> ``LDG``)."""
    return _INSTRUCTION.findall(sass)


def instruction_mix(sass: str) -> Mix:
    """Count the instruction classes of one kernel's SASS (NOPs of the padding left out).

    >>> text = "/*0000*/ LDG.E R1, desc[UR4][R2.64] ;\\n/*0010*/ @!P0 LDG.E R3, desc[UR4][R4.64] ;\\n" \\
    ...        "/*0020*/ STS [R5], R1 ;\\n/*0030*/ IMAD R6, R7, R8, RZ ;\\n/*0040*/ NOP ;\\n"
    >>> instruction_mix(text)
    Mix(instructions=4, ldg=2, sts=1, lds=0, fma=0, integer=1, ldg_run=2, per_load=0.0, hmma=0)
    """
    ops = [o for o in opcodes(sass) if o != "NOP"]
    counts = Counter(ops)
    run = longest = 0
    for op in ops:
        if op == "LDG":
            run += 1
        elif op == "STS":  # the loads since the last store feed this one: the run counts
            longest, run = max(longest, run), 0
    integer = sum(n for op, n in counts.items() if op in INTEGER or (op[:1] == "U" and op[1:] in INTEGER))
    return Mix(len(ops), counts["LDG"], counts["STS"], counts["LDS"], sum(counts[op] for op in FMA), integer,
               longest, per_load(sass), counts["HMMA"])


def loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The opcodes in program order and each loop as (first, last) instruction index: a branch back to a label."""
    ops: list[str] = []
    labels: dict[str, int] = {}
    found = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        if m.group(1):
            labels[m.group(1)] = len(ops)
            continue
        if m.group(2) == "NOP":
            continue
        if m.group(2) == "BRA" and m.group(3) in labels and labels[m.group(3)] <= len(ops):
            found.append((labels[m.group(3)], len(ops)))
        ops.append(m.group(2))
    return ops, found


def per_load(sass: str) -> float:
    """Instructions per global load in the innermost loop whose loads feed shared stores (0 without one).

    The instructions of loops nested in it run a different number of times and are left out, so
    for a K-tile loop this is its tile-loading cost per element, the barrier and operand load
    included: a SASS-derived estimate of the dynamic cost, not a measurement.
    """
    ops, found = loops(sass)
    best = None
    for first, last in found:
        body = ops[first:last + 1]
        if "LDG" not in body or "STS" not in body:
            continue
        inner = {i for a, b in found if first <= a and b <= last and (a, b) != (first, last) for i in range(a, b + 1)}
        own = [ops[i] for i in range(first, last + 1) if i not in inner]
        loads = own.count("LDG")
        if loads and (best is None or last - first < best[0]):
            best = (last - first, len(own) / loads)
    return 0.0 if best is None else round(best[1], 1)
