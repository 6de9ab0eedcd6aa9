"""The tensor-core GEMM without a GPU: its shared-memory swizzle, its inline PTX, and its SASS for
sm_80 and sm_90 (no spills, HMMA instructions). Its numbers run in the simulator
(``tests/cuda_sim_mma_cases.py``)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from cellgen.backends.cuda import gemm, mma

REPO = Path(__file__).resolve().parent.parent
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
WORDS = gemm.MMA_WORDS  # 32-bit words per tile row: 16, so a row's parity is bank bit 4
MMA_KERNELS = ("hoisted_mma_f16", "hoisted_mma_bf16", "hoisted_tn_mma_f16", "hoisted_tn_mma_bf16")


def _bank(row: int, word: int) -> int:
    """The bank of word ``word`` of tile row ``row`` as the kernel stores it (swizzled)."""
    return (row * WORDS + (word ^ int(gemm.swizzle(np.uint32(row))))) % 32


def test_swizzle_is_a_permutation_of_each_row() -> None:
    for row in range(gemm.MMA_TILE_M):
        assert sorted(q ^ int(gemm.swizzle(np.uint32(row))) for q in range(WORDS)) == list(range(WORDS))


@pytest.mark.parametrize("base", range(0, gemm.MMA_TILE_M, 8))
@pytest.mark.parametrize("word", [0, 4, 8, 12])
def test_fragment_reads_are_free_of_bank_conflicts(base: int, word: int) -> None:
    # one A or B fragment register: lane (g, t) reads word `word + t` of row `base + g` (base: a multiple of 8)
    banks = {_bank(base + (lane >> 2), word + (lane & 3)) for lane in range(32)}
    assert len(banks) == 32


@pytest.mark.parametrize("step", range(gemm.MMA_PER_THREAD))
@pytest.mark.parametrize("warp", range(gemm.MMA_THREADS // 32))
def test_tile_stores_are_free_of_bank_conflicts(step: int, warp: int) -> None:
    lanes = [32 * warp + lane for lane in range(32)]
    by_rows = {_bank((tid >> 4) + 8 * step, tid & 15) for tid in lanes}  # A [M, K]: 2 rows x 16 words
    by_columns = {_bank(tid & 63, (tid >> 6) + 2 * step) for tid in lanes}  # W, and A given as [K, M]
    assert len(by_rows) == 32 and len(by_columns) == 32


def test_tile_constants() -> None:
    assert (gemm.MMA_TILE_M, gemm.MMA_TILE_N, gemm.MMA_TILE_K, gemm.MMA_THREADS) == (64, 64, 32, 128)
    # every word of both tiles is loaded by exactly one thread and step
    assert gemm.MMA_PER_THREAD * gemm.MMA_THREADS == gemm.MMA_TILE_M * WORDS == gemm.MMA_TILE_N * WORDS
    assert [k for k, _ in gemm.MMA_ARGS] == ["a", "w", "bias", "c", "k"]


def test_device_functions_take_half_storage_only() -> None:
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        mma.device_functions(None, True, "float32")


def test_every_module_lists_the_tensor_core_kernels_for_inspect() -> None:
    from cellgen.tools.sass import runtime_kernels

    text = (REPO / "generated" / "lstm.py").read_text()
    found = next(node.value for node in ast.parse(text).body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", None) == "_CUDA_RUNTIME")
    names = ast.literal_eval(found)
    assert set(MMA_KERNELS) <= set(names) and set(names) <= set(runtime_kernels())


@pytest.mark.skipif(SIMULATED, reason="compile_ptx needs the real numba.cuda, not the simulator")
@pytest.mark.parametrize("storage", sorted(mma.OPCODES))
def test_mma_intrinsic_emits_the_instruction(storage: str) -> None:
    from numba import cuda, types

    ops = mma.device_functions(cuda, False, storage)
    pack, product = ops.pack, ops.mma  # closure constants: numba types functions, not a namespace

    def kernel(a, out):
        lane = cuda.laneid
        word = pack(a[2 * lane], a[2 * lane + 1])
        d = product(word, word, word, word, word, word, out[lane], out[lane], out[lane], out[lane])
        out[lane] = d[0] + d[1] + d[2] + d[3]

    ptx, _ = cuda.compile_ptx(kernel, (types.Array(types.uint16, 1, "C"), types.Array(types.float32, 1, "C")),
                              cc=(8, 0))
    assert mma.OPCODES[storage] in ptx


@pytest.mark.skipif(SIMULATED, reason="compile_ptx needs the real numba.cuda, not the simulator")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_gemm_sass_has_hmma_and_no_spills(arch: str) -> None:
    pytest.importorskip("cuda.bindings")
    from cellgen.tools.sass import inspect_runtime
    from cellgen.tools.sass_mix import nvdisasm

    try:
        nvdisasm()
    except ValueError as err:
        pytest.skip(str(err))
    reports = inspect_runtime(list(MMA_KERNELS), [arch], ["float32"], mix=True)
    assert [(r.kernel, r.dtype) for r in reports] == [
        ("hoisted_mma_f16", "float16"), ("hoisted_mma_bf16", "bfloat16"),
        ("hoisted_tn_mma_f16", "float16"), ("hoisted_tn_mma_bf16", "bfloat16")]
    for r in reports:
        assert r.spills == 0 and r.stack == 0, r
        # one K tile's 2 k16 steps x 2 x 4 MMAs per warp, written once in the loop body
        assert r.mix.hmma == 16, r
        assert r.registers <= 168 and r.smem == 2 * gemm.MMA_TILE_M * WORDS * 4, r
