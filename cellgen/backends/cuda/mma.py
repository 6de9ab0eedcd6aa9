"""Tensor-core matrix multiply for kernels: ``mma.sync.aligned.m16n8k16`` as numba intrinsics, and
the same warp-level operation emulated for numba's simulator.

numba-cuda has no MMA API, so :func:`device_functions` hands kernels inline PTX wrapped in numba
intrinsics (they compile without a device, through ``compile_ptx``, and inline into the kernel):

* ``mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)``:
  ``mma.sync.aligned.m16n8k16.row.col.f32.<t>.<t>.f32`` with ``<t>`` = ``f16`` or ``bf16``:
  D[16x8] = A[16x16] @ B[16x8] + C[16x8], A and B in 16-bit storage, C and D float32, one warp.
  A is 4 x .b32 registers (two 16-bit elements each), B 2, C and D 4 float32 each.
* ``pack(lo, hi) -> uint32``: two 16-bit patterns (uint16) in one .b32 register, ``lo`` in bits 0-15
  (the element with the lower index, as the fragment tables list them "low to high").

Fragment layout, from the PTX ISA, section "Matrix Fragments for mma.m16n8k16 with floating point
type" (9.7.14.5.8 in the ISA version read; the numbering moves between versions), with
``groupID = %laneid >> 2`` and ``threadID_in_group = %laneid % 4`` (g and t below). The ISA numbers
*elements* (a0..a7, b0..b3, c0..c3), two per .b32 register for A and B; per register:

==========  ===========================  ===========================================
register    elements                     row, column
==========  ===========================  ===========================================
A reg 0     a0, a1                       row g,     columns 2t, 2t + 1
A reg 1     a2, a3                       row g + 8, columns 2t, 2t + 1
A reg 2     a4, a5                       row g,     columns 2t + 8, 2t + 9
A reg 3     a6, a7                       row g + 8, columns 2t + 8, 2t + 9
B reg 0     b0, b1                       rows (k) 2t, 2t + 1,     column g
B reg 1     b2, b3                       rows (k) 2t + 8, 2t + 9, column g
C/D 0..3    c0, c1, c2, c3               c0, c1: row g, columns 2t, 2t + 1;
                                         c2, c3: row g + 8, columns 2t, 2t + 1
==========  ===========================  ===========================================

(ISA text: A row = g for a_i with 0 <= i < 2 or 4 <= i < 6, g + 8 otherwise; A col = 2t + (i & 1)
for i < 4, 2t + (i & 1) + 8 for i >= 4; B row = 2t + (i & 1) for i < 2, + 8 for i >= 2, B col = g;
C row = g for i < 2, g + 8 for i >= 2, C col = 2t + (i & 1).) ``.row.col``: A is read row by row
(k along a register), B column by column (k along a register), which the table already states.

**The simulator** (:func:`_simulated_mma`) has no warp shuffle and no warp barrier (``syncwarp``):
each lane writes its six operand registers into a per-block scratch in shared memory indexed by
(warp, lane), with its four C values; the block synchronises (``syncthreads``); lane 0 of each
warp rebuilds the warp's A (16x16), B (16x8) and C (16x8) from the 32 lanes' registers with the
table above and computes D = A @ B + C in float32 (the products of widened halves are exact in
float32: 11 x 11 significant bits for float16, 8 x 8 for bfloat16; they are summed in float32),
written back over C in the scratch; the block synchronises again and every lane reads its own four
D elements by the same table (the next call writes the scratch only after every lane has read).
So in the simulator every thread of the block must reach every ``mma`` call (true of a GEMM
whose warps all run the same K loop); on the device only the warp must, as ``.sync.aligned``
requires. What the emulation cannot tell: the hardware's summation order and its rounding inside
the K-sum (tensor cores are documented only to accumulate in at least float32), throughput, and
that the inline PTX assembles (``compile_ptx`` plus the SASS link check that).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

#: The oldest compute capability with these instructions (m16n8k16 with f16 or bf16 operands).
ARCH = (8, 0)
#: The MMA shape: D[M x N] = A[M x K] @ B[K x N] + C.
M, N, K = 16, 8, 16
#: The PTX instruction per half storage dtype.
OPCODES = {"float16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
           "bfloat16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"}
#: Registers per lane: A, B, C/D.
A_REGS, B_REGS, C_REGS = 4, 2, 4
#: Warps per block the simulator's scratch has room for (1024 threads).
MAX_WARPS = 32

cuda = None  # numba.cuda, bound by device_functions (the simulator swaps it inside its device functions)


# -- the fragment layout (the table in the module docstring), per lane and register ---------------
def a_index(lane: int, reg: int, half: int) -> tuple[int, int]:
    """(row, column) in A [16 x 16] of half ``half`` (0: bits 0-15) of A register ``reg`` of ``lane``."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (reg & 1), 2 * t + half + 8 * (reg >> 1)


def b_index(lane: int, reg: int, half: int) -> tuple[int, int]:
    """(row k, column) in B [16 x 8] of half ``half`` of B register ``reg`` of ``lane``."""
    g, t = lane >> 2, lane & 3
    return 2 * t + half + 8 * reg, g


def c_index(lane: int, element: int) -> tuple[int, int]:
    """(row, column) in C / D [16 x 8] of accumulator ``element`` (0..3) of ``lane``."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (element >> 1), 2 * t + (element & 1)


def _gather_tables() -> tuple[np.ndarray, ...]:
    """Flat (lane, register, half) -> row, column index arrays for A and B: the emulation rebuilds a
    warp's A and B from its 32 lanes' registers with one NumPy scatter each."""
    a = np.array([a_index(lane, r, h) for lane in range(32) for r in range(A_REGS) for h in range(2)]).T
    b = np.array([b_index(lane, r, h) for lane in range(32) for r in range(B_REGS) for h in range(2)]).T
    c = np.array([c_index(lane, e) for lane in range(32) for e in range(C_REGS)]).T
    return a[0], a[1], b[0], b[1], c[0], c[1]


_A_ROWS, _A_COLS, _B_ROWS, _B_COLS, _C_ROWS, _C_COLS = _gather_tables()


# -- host helpers (the emulation's and the tests' arithmetic) --------------------------------------
def widen(bits: np.ndarray, storage: str) -> np.ndarray:
    """16-bit patterns (uint16) of ``storage`` as float32 values (exact)."""
    bits = np.asarray(bits, dtype=np.uint16)
    if storage == "bfloat16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def bits_of(values: np.ndarray, storage: str) -> np.ndarray:
    """Host values rounded to ``storage``, as 16-bit patterns (uint16)."""
    from cellgen.backends.cuda import precision

    held = precision.to_storage(np.asarray(values), storage)
    return held.view(np.uint16) if storage == "float16" else held


def warp_product(words: np.ndarray, c: np.ndarray, storage: str) -> np.ndarray:
    """A warp's D [32 lanes, 4] (float32) from its lanes' operand registers ``words`` [32, 6] (A regs
    0-3, B regs 0-1, uint32) and accumulators ``c`` [32, 4]: D = A @ B + C, the products exact and
    summed in float32."""
    words = np.asarray(words, dtype=np.uint32)
    halves = np.stack([words & np.uint32(0xFFFF), words >> np.uint32(16)], axis=-1).astype(np.uint16)
    a = np.zeros((M, K), np.float32)
    b = np.zeros((K, N), np.float32)
    a[_A_ROWS, _A_COLS] = widen(halves[:, :A_REGS].reshape(-1), storage)
    b[_B_ROWS, _B_COLS] = widen(halves[:, A_REGS:].reshape(-1), storage)
    cm = np.zeros((M, N), np.float32)
    cm[_C_ROWS, _C_COLS] = np.asarray(c, np.float32).reshape(-1)
    d = np.matmul(a, b, dtype=np.float32) + cm
    return d[_C_ROWS, _C_COLS].reshape(32, C_REGS)


# -- the simulator's device functions -------------------------------------------------------------
def _simulated_mma(storage: str) -> Any:
    """The warp-level MMA for the simulator, as a device function (see the module docstring): lane 0
    of each warp computes the warp's D between two block barriers, every lane then reads its own."""

    def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        regs = cuda.shared.array((MAX_WARPS, 32, A_REGS + B_REGS), np.uint32)
        acc = cuda.shared.array((MAX_WARPS, 32, C_REGS), np.float32)
        tid = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
        warp, lane = tid // 32, tid % 32
        for r, word in enumerate((a0, a1, a2, a3, b0, b1)):
            regs[warp, lane, r] = word
        for r, value in enumerate((c0, c1, c2, c3)):
            acc[warp, lane, r] = value
        cuda.syncthreads()
        if lane == 0:
            acc[warp] = warp_product(regs[warp], acc[warp], storage)
        cuda.syncthreads()
        return tuple(np.float32(x) for x in acc[warp, lane])

    return cuda.jit(device=True)(mma)


def _simulated_pack(lo, hi):
    """Two uint16 patterns in one uint32, ``lo`` in the low half (the simulator's :func:`pack`)."""
    return np.uint32(np.uint32(lo) | (np.uint32(hi) << np.uint32(16)))


# -- the device intrinsics -------------------------------------------------------------------------
def _mma_intrinsic(storage: str) -> Any:
    """``mma.sync.aligned.m16n8k16.row.col.f32.<t>.<t>.f32`` as inline PTX: 6 .b32 operands in "r"
    registers, 4 float32 accumulators in "f" registers, 4 float32 results as a UniTuple."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    opcode = OPCODES[storage]
    text = f"{opcode} {{$0,$1,$2,$3}}, {{$4,$5,$6,$7}}, {{$8,$9}}, {{$10,$11,$12,$13}};"
    result = types.UniTuple(types.float32, C_REGS)

    @intrinsic
    def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = result(*([types.uint32] * (A_REGS + B_REGS) + [types.float32] * C_REGS))

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * C_REGS), [i32] * (A_REGS + B_REGS) + [f32] * C_REGS)
            asm = ir.InlineAsm(fnty, text, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", side_effect=False)
            out = builder.call(asm, list(args))
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_value(out, i) for i in range(C_REGS)])

        return sig, codegen

    return mma


def _pack_intrinsic() -> Any:
    """Two 16-bit patterns in one .b32 register as LLVM IR (zero-extend, shift, or)."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def pack(typingctx, lo, hi):
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            low, high = (builder.zext(builder.trunc(x, ir.IntType(16)), i32) for x in args)
            return builder.or_(low, builder.shl(high, ir.Constant(i32, 16)))

        return types.uint32(types.uint16, types.uint16), codegen

    return pack


def supported() -> bool:
    """Whether kernels may issue these MMAs here: in numba's simulator (the emulation) and on sm_80 or newer."""
    from cellgen.backends.cuda import runtime

    module = runtime.numba_cuda()
    return runtime.simulated() or tuple(module.get_current_device().compute_capability) >= ARCH


_DEVICE: dict[str, Any] = {}


def device_functions(module: Any, simulated: bool, storage: str) -> SimpleNamespace:
    """``mma`` (for ``storage``, "float16" or "bfloat16") and ``pack`` for a kernel: the intrinsics on
    the device (and in ``compile_ptx``), the emulation in the simulator. ``module`` is numba.cuda."""
    global cuda
    if storage not in OPCODES:
        raise ValueError(f"tensor-core MMA takes float16 or bfloat16 storage, got {storage!r}")
    cuda = module
    if simulated:
        return SimpleNamespace(mma=_simulated_mma(storage), pack=_simulated_pack)
    key = storage
    if key not in _DEVICE:
        _DEVICE[key] = _mma_intrinsic(storage)
    if "pack" not in _DEVICE:
        _DEVICE["pack"] = _pack_intrinsic()
    return SimpleNamespace(mma=_DEVICE[key], pack=_DEVICE["pack"])
