"""The CUDA backend without a GPU: plan facts, real SASS for sm_80/sm_90, and the simulator suite.

* facts: which GEMMs fuse their epilogue, gate interleaving, GPU double-buffering, and the
  launch layout (``CudaLayout``) that decides what the template prints;
* the hoisted GEMM is the runtime's (``cellgen.backends.cuda.gemm``), never a generated copy;
* compilation: every shipped spec's kernels through NVVM + nvJitLink, 0 spill bytes;
* numbers: ``cuda_sim_cases.py`` in a fresh process with ``NUMBA_ENABLE_CUDASIM=1`` (numba
  chooses the simulator when numba.cuda is first imported, so it cannot share this process).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy

from cellgen.backends.cuda import gemm
from cellgen.backends.cuda.context import layout_context
from cellgen.backends.cuda.layout import (
    BATCH,
    MMA_TILE_K,
    CudaLayout,
    KernelArg,
    bank_swizzle,
    cuda_layout,
    gate_of,
    gpu_double_buffered,
    stage_layouts,
    store_conflicts,
)
from cellgen.backends.cuda.runtime import interleave
from cellgen.build import compile_spec, generate
from cellgen.codegen.render import environment
from cellgen.tools.sass import inspect_specs, occupancy, parse_log

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "specs").glob("*.py"))
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _plan(name: str):
    return compile_spec(REPO / "specs" / f"{name}.py")[1]


# -- facts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [
    ("lstm", [(4, "num_units", True, ()), (1, "num_proj", True, ())]),
    ("gru", [(2, "num_units", True, (1,)), (1, "num_units", True, ())]),  # u's columns kept for step 2
    ("gru_cudnn", [(3, "num_units", True, ())]),
    ("basic_lstm", [(4, "num_units", True, ())]),
    ("basic_rnn", [(1, "num_units", True, ())]),
    ("qrnn", []),
])
def test_stage_layouts(name: str, expected) -> None:
    got = [(lay.gates, str(lay.units), lay.fused, lay.stored) for lay in stage_layouts(_plan(name))]
    assert got == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("lstm", ()), ("gru", ()), ("gru_cudnn", ("h",)), ("basic_lstm", ("h",)), ("basic_rnn", ("h",)), ("qrnn", ()),
])
def test_gpu_double_buffers_states_a_fused_kernel_reads_whole(name: str, expected) -> None:
    plan = _plan(name)
    assert gpu_double_buffered(plan, stage_layouts(plan)) == expected


def test_gate_of_and_interleave() -> None:
    import sympy

    from cellgen.ir.plan import UNIT

    n = sympy.Symbol("num_units", positive=True, integer=True)
    assert [gate_of(UNIT + k * n, n, 4) for k in range(4)] == [0, 1, 2, 3]
    assert gate_of(UNIT + 4 * n, n, 4) is None and gate_of(UNIT + 1, n, 4) is None
    w = np.arange(12).reshape(2, 6)  # 3 gates of 2 units
    packed = interleave(w, 3)
    assert packed[:, 0 * 3 + 2].tolist() == w[:, 2 * 2 + 0].tolist()  # unit 0, gate 2
    assert packed[:, 1 * 3 + 1].tolist() == w[:, 1 * 2 + 1].tolist()  # unit 1, gate 1


def test_generated_kernels_read_accumulators() -> None:
    text = (REPO / "generated" / "lstm.py").read_text()
    stage0 = text[text.index("def _cuda_stage0_float32"):text.index("def _cuda_stage1_float32")]
    assert re.search(r"\brec0\[", stage0) is None  # the gate pre-activations never go through global memory
    assert all(f"_acc{k}" in stage0 for k in range(4))
    assert "if t < lengths[b]:" in stage0


# -- the launch layout decides, the template prints ---------------------------------------------
def _size(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, positive=True, integer=True)


def _args(kernel) -> list[str]:
    return [a.name for a in kernel.args]


def _render(layout: CudaLayout) -> str:
    """The CUDA forward's template alone, from a layout (``sizes_from_dict`` as the module template binds it)."""
    return environment().get_template("cuda/forward.py.j2").render(cuda=layout_context(layout),
                                                                   sizes_from_dict="pass")


def test_lstm_layout() -> None:
    layout = cuda_layout(_plan("lstm"))
    assert [k.name for k in layout.kernels] == ["stage0", "stage1"] and not layout.scan
    assert layout.block == (32, 4) and layout.tile_k == 32
    assert layout.hoisted and not layout.delayed and layout.double_buffered == ()
    assert layout.gates == (4, 1) and layout.weights == ("w_rec0", "w_rec1")
    assert [(b.name, str(b.width)) for b in layout.buffers] == [("opnd1", "num_units")]
    stage0, stage1 = layout.kernels
    # arguments from the IR: the epilogue's Indexed bases and free symbols, the GEMM's operand and weight
    assert _args(stage0) == ["t", "pre", "lengths", "w_rec0", "opnd1", "p_w_f_diag", "p_w_i_diag", "p_w_o_diag",
                             "hy_forget_bias", "hy_cell_clip", "n_num_units", "n_num_proj", "s_c", "s_h"]
    assert _args(stage1) == ["t", "lengths", "w_rec1", "opnd1", "hy_proj_clip", "n_num_units", "n_num_proj", "s_h",
                             "out"]
    assert KernelArg("pre", "array3") in stage0.args and KernelArg("hy_cell_clip", "real") in stage0.args
    g0, g1 = stage0.gemm, stage1.gemm
    assert (g0.operand, g0.gates, g0.interleaved, g0.columns, g0.weight_tile, g0.threads, g0.stored) == \
        ("s_h", 4, True, 128, 4096, 128, ())
    assert g0.acc_columns == (0, 32, 64, 96)
    assert (g1.operand, g1.gates, g1.interleaved, g1.columns, str(g1.units)) == ("opnd1", 1, False, 32, "num_proj")
    assert stage0.grid == ((_size("num_units"),), BATCH) and stage1.grid == ((_size("num_proj"),), BATCH)
    assert stage0.per_step and stage0.runs_epilogue and stage0.epilogue == 1 and stage1.epilogue == 2
    assert stage0.views == ("pre",) and stage1.views == ("out",) and not stage0.masked and stage1.masked

    assert (g0.rows_per_thread, g0.per_thread, g0.swizzle(4), g0.swizzle(8)) == (8, 32, 8, 4)
    assert (g1.per_thread, g1.swizzle(4)) == (8, 0)

    text = _render(layout)
    assert "_sw = cuda.shared.array((32, 128), np.float32)" in text  # tile_k x columns
    assert "_wv = cuda.local.array(32, np.float32)" in text  # a thread's weight elements of a tile: per_thread
    assert "_acc3 += _a * _sw[_q, _col3]" in text  # acc_columns, rotated by the swizzle
    assert "_col3 = np.uint32(np.uint32(96) + (_ux + np.uint32(24)) % np.uint32(32))" in text
    # stage0 and stage0_all, in float32 and float64 (and float16 / bfloat16: their shared tile is float32)
    assert text.count("(_u + _g * np.uint32(8))") == 8 + 16 and text.count("(_u + _g * np.uint32(4))") == 8
    assert "_wv[_r * 4 + 3] = w_rec0[_k, _gc3] if _in and _ok3 else np.float32(0.0)" in text
    assert "def _cuda_stage1_float64(" + ", ".join(_args(stage1)) + "):" in text
    assert "launches.append((kern_stage1, grid_stage1, block_stage1, (" + ", ".join(_args(stage1)) + ", )))" in text
    assert "kern_stage1 = k.stage1\n" in text and "kern_stage1 = k.stage1_all\n" in text
    assert "grid_stage1 = (_rtc.blocks(n_num_proj, 32), _rtc.blocks(B, 4))" in text
    assert "grid_stage1 = (_rtc.blocks(n_num_proj, 32), 1)" in text and "block_stage1 = (32, 16)" in text
    assert "for t in range(T):" in text and "s_h, sn_h = sn_h, s_h" not in text

    # B <= 16: the same kernels with one block over all rows (2 tile rows a thread)
    assert [k.name for k in layout.all_rows] == ["stage0_all", "stage1_all"] and layout.all_rows_max == 16
    assert all(k.block == (32, 16) and k.gemm.block == (32, 16) for k in layout.all_rows)
    assert layout.all_rows[0].gemm.rows_per_thread == 2 and layout.all_rows[0].args == stage0.args
    assert "_sa = cuda.shared.array((16, 32), np.float32)" in text
    # the persistent kernel: both stages, a grid barrier after each, the weight slices in dynamic shared memory
    p = layout.persistent
    assert p is not None and p.block == (32, 4) and [k.name for k in p.stages] == ["stage0", "stage1"]
    assert "t" not in p.arg_names and "out" in p.arg_names and set(p.arg_names) >= set(_args(stage0)) - {"t"}
    persistent = text[text.index("def _cuda_persistent_float32("):text.index("def _cuda_persistent_float64(")]
    assert persistent.count("_grid.sync()") == 2 and "_sw = cuda.shared.array(0, _nb_float32)" in persistent
    assert "for t in range(out.shape[0]):" in persistent
    assert "_acc3 += _a * _sw[_wq + np.uint32(_q * 128 + 96)]" in persistent  # gate-major, unrotated
    # in half storage the same stages on tensor cores: 16-row groups, k-pair words, 4 column tiles a warp in
    # stage 0 (128 columns / 4 warps / 8), 1 in stage 1 (32 columns), two MMAs (operand split) a tile
    start = text.index("def _cuda_persistent_float16(")
    half = text[start:text.index("\ndef ", start)]
    assert p.warps == 4 and [p.mma_tiles(k) for k in p.stages] == [4, 1] and p.mma_width == 136
    assert "_sw = cuda.shared.array(0, _nb_uint32)" in half and "_ng = np.uint32((B + 15) // 16)" in half
    assert half.count("= _mma_f16(_h0, _h1, _h2, _h3, _q0, _q1, ") == 4 + 1
    assert half.count("= _mma_f16(_l0, _l1, _l2, _l3, _q0, _q1, ") == 4 + 1
    assert "_acc3 = _sd[_ro, np.uint32(96) + _ux]" in half and "_a * _sw" not in half
    assert "_mma_bf16(" not in half and "_mma_f16(" not in persistent

    # change a decision in the layout: the template follows, it decides nothing itself
    wide = dataclasses.replace(stage1, block=(64, 2), gemm=dataclasses.replace(g1, block=(64, 2), tile_k=64),
                               masked=False)
    text = _render(dataclasses.replace(layout, kernels=(stage0, wide), all_rows=(), persistent=None))
    assert "_CUDA_ALL_ROWS" not in text and "k.persistent" not in text
    assert "block_stage1 = (64, 2)" in text and "grid_stage1 = (_rtc.blocks(n_num_proj, 64), _rtc.blocks(B, 2))" in text
    assert "_sw = cuda.shared.array((64, 64), np.float32)" in text and "for _q in range(64):" in text
    assert "    j = cuda.blockIdx.x * 64 + _tx\n    b = cuda.blockIdx.y * 2 + _ty" in text
    assert "out_t[b, j] = np.float32(0.0)" not in text  # no masked branch


@pytest.mark.parametrize(("name", "step"), [
    ("basic_lstm", [("backward_stage0", [1, "0@t-1"])]),
    ("basic_rnn", [("backward_stage0", [1, "0@t-1"])]),
    ("gru_cudnn", [("backward_stage0", [1, "0@t-1"])]),
    ("gru", [("backward_stage1", [1]), ("backward_stage0", [2, "0@t-1"])]),  # drec1 kept for epilogue 2
    ("lstm", [("backward_stage1", [1]), ("backward_stage0", [2, "0@t-1"])]),
    ("qrnn", []),  # no recurrent GEMM: the reverse scan is one kernel for every step
])
def test_backward_runs_one_fused_kernel_per_stage(name: str, step) -> None:
    """Issue 13, item 5: per reverse step ONE kernel per transposed GEMM, which applies the epilogue the
    GEMM feeds from its accumulator, the last also epilogue 0 of step t - 1; only step T - 1's epilogue 0
    runs alone (before the loop). The generated loop launches no runtime GEMM and no lone epilogue."""
    from cellgen.backends.cuda.backward import layout_of
    from cellgen.backends.cuda.backward_layout import BackwardKernel
    from cellgen.ir.backward import training_plan

    tp = training_plan(_plan(name).spec)
    layout = layout_of(tp)
    assert all(isinstance(k, BackwardKernel) for k in layout.step)
    parts = [(k.name, [f"{p.epilogue}@t-1" if p.next_step else p.epilogue for p in k.parts]) for k in layout.step]
    assert parts == step
    assert layout.fused_stages == tp.stages and layout.launches_per_step == len(tp.stages)
    assert [k.name for k in layout.first] == (["backward0"] if tp.stages else [])
    assert (layout.scan is None) == bool(tp.stages)
    if layout.scan:
        assert layout.scan.name == "backward_scan" and layout.scan.args[:2] == ("T", "lengths")
    assert all(p.accumulator for k in layout.step for p in k.parts[:1] if k.gemm is not None)
    assert [k.stored for k in layout.step if k.gemm] == ([True, False] if name == "gru" else [False] * len(tp.stages))
    _, text = generate(REPO / "specs" / f"{name}.py")
    start = text.index("def _cuda_backward(")
    loop = text[start:text.index("# after the loop", start)]
    assert "_cuda_gemm" not in loop and ("for t in range(T - 1, -1, -1):" in loop) == bool(tp.stages)
    if tp.stages:
        assert "k.backward0[" not in loop[loop.index("for t in range(T - 1, -1, -1):"):]
    unfused = layout_of(tp, fuse=False)
    assert unfused.fused_stages == () and unfused.launches_per_step == 2 * len(tp.stages) + 1 and not unfused.scan


def test_stage_gemm_checks_its_tile() -> None:
    g0 = cuda_layout(_plan("basic_lstm")).kernels[0].gemm
    with pytest.raises(ValueError, match="K tile 16 != 32"):
        dataclasses.replace(g0, tile_k=16)
    with pytest.raises(ValueError, match="multiple of 32 units"):
        dataclasses.replace(g0, block=(48, 4), tile_k=48)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("gates", [1, 2, 3, 4, 5, 8])
def test_shared_tile_has_no_bank_conflicts(gates: int, itemsize: int) -> None:
    """The rotation per gate makes a warp's stores of 32 consecutive interleaved columns (several
    units and gates) hit distinct banks, which the unrotated gate-major tile does not (G-way
    conflicts); a warp's FMA reads (its 32 units of one gate) stay conflict-free."""
    swizzle = bank_swizzle(gates, 32, itemsize)
    assert store_conflicts(gates, 32, swizzle, itemsize) == 1
    assert store_conflicts(gates, 32, 0, itemsize) == (min(gates, 32 * 4 // itemsize) if gates > 1 else 1)
    lanes = 128 // itemsize
    for g in range(gates):
        for start in range(0, 32, lanes):
            cols = [g * 32 + (u + swizzle * g) % 32 for u in range(start, start + lanes)]
            assert len({c * itemsize // 4 % 32 for c in cols}) == lanes


@pytest.mark.skipif(SIMULATED, reason="compile_ptx needs the real numba.cuda, not the simulator")
def test_stage_kernel_loads_a_tile_in_flight() -> None:
    """Issue 13, item 1, in SASS: the stage kernel's K-tile loop issues a thread's whole tile of weight
    loads before its shared stores (the old loop: one load, then its store) at a few instructions
    per load (the old loop spent ~75 on 64-bit signed index math); no spills."""
    pytest.importorskip("cuda.bindings")
    from cellgen.tools.sass_mix import nvdisasm

    try:
        nvdisasm()
    except ValueError as err:
        pytest.skip(str(err))
    reports = inspect_specs([REPO / "specs" / "lstm.py"], ["sm_90"], ["float32"], mix=True, kernels={"stage0"})
    (r,) = reports
    assert r.spills == 0 and r.stack == 0
    assert r.mix.ldg_run >= 32 and r.mix.per_load <= 10, r.mix


def test_qrnn_layout() -> None:
    layout = cuda_layout(_plan("qrnn"))
    assert layout.scan and layout.hoisted and layout.delayed and layout.stages == () and layout.gates == ()
    (scan,) = layout.kernels
    assert scan.name == "scan" and not scan.per_step and scan.gemm is None and scan.guarded
    assert _args(scan) == ["pre", "pre0", "lengths", "n_num_units", "s_c", "out"]  # no t: its loop is inside
    assert scan.views == ("pre", "pre_prev", "out") and scan.copies == () and layout.buffers == ()
    assert layout.recurrent_states == ("c",) and layout.delay_state == "x_prev"

    text = _render(layout)
    assert "k.scan[grid_scan, block_scan](pre, pre0, lengths, n_num_units, s_c, out)" in text
    assert "for t in range(T):" not in text  # one launch for all steps
    assert "pre0 = _rtc_storage.hoisted_gemm(x0.reshape(1, B, x0.shape[1]), weights.hoisted, weights.bias)[0]" in text
    assert "pre_prev = pre0 if t == 0 else pre[t - 1]" in text

    reordered = dataclasses.replace(scan, args=scan.args[::-1])
    text = _render(dataclasses.replace(layout, kernels=(reordered,), delayed=False))
    assert "def _cuda_scan_float32(out, s_c, n_num_units, lengths, pre0, pre):" in text
    assert "pre0 = _cuda_gemm" not in text


RUNTIME = ("hoisted", "hoisted_tn", "hoisted_mma_f16", "hoisted_mma_bf16", "hoisted_tn_mma_f16", "hoisted_tn_mma_bf16")


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_generated_modules_launch_the_runtime_gemm(spec: Path) -> None:
    """No generated module carries a GEMM kernel of its own: the hoisted GEMM is cellgen.backends.cuda.gemm's."""
    name, text = generate(spec)
    cuda_part = text[text.index("# ---- CUDA backend"):text.index("_backend_cuda =")]
    # no GEMM of its own: no hoisted kernel, no 2-D register tile (a stage kernel's 1-D ``_wv`` holds its tile loads)
    assert "_cuda_hoisted" not in cuda_part and "cuda.local.array((" not in cuda_part
    assert '"hoisted"' not in cuda_part.split("_CUDA_RUNTIME =")[0]  # not among the module's own kernels
    assert "pre = _rtc_storage.hoisted_gemm(xs, weights.hoisted, weights.bias)" in cuda_part  # the runtime GEMM
    constants = {node.targets[0].id: node.value for node in ast.parse(text).body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    # + the backward's a^T @ w, and both on tensor cores for float16 / bfloat16 storage
    assert ast.literal_eval(constants["_CUDA_RUNTIME"]) == RUNTIME
    args = ast.literal_eval(constants["_CUDA_ARGS"])
    layout = cuda_layout(_plan(name))
    for kernel in layout.kernels:  # _CUDA_ARGS is the layout's, argument for argument
        assert args[kernel.name] == tuple((a.name, a.kind) for a in kernel.args)


def test_runtime_gemm_constants() -> None:
    assert (gemm.TILE, gemm.THREADS, gemm.TILE_K, gemm.PER_THREAD, gemm.BLOCK) == (64, 16, 16, 4, (16, 16))
    assert [k for k, _ in gemm.ARGS] == ["a", "w", "bias", "c"]
    assert gemm.source("float32").__closure__ is not None  # element type and zero are closure constants


def test_occupancy_and_log_parsing() -> None:
    assert occupancy("sm_90", 128, 32, 0) == 1.0
    assert occupancy("sm_80", 256, 255, 0) == 0.125  # 255 -> 256 regs: 8 warps of 256 threads
    assert occupancy("sm_80", 128, 32, 80 * 1024) == 0.125  # 81 KiB with the reservation: 2 blocks in 164 KiB
    log = ("ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 472 bytes cmem[0]\n")
    assert parse_log(log) == {"registers": 40, "stack": 8, "spill_stores": 4, "spill_loads": 12}


def test_cuda_backend_without_numba_cuda_is_a_clear_error() -> None:
    """The generated module imports and runs on the CPU when numba.cuda cannot be imported."""
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "numba.cuda" or name.startswith("numba.cuda.") or name.split(".")[0] == "numba_cuda":
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import numpy as np
import generated.gru as m
from cellgen.backends.cuda.runtime import CudaUnavailable
params, x = m.init_params(3, 4, seed=0), np.zeros((2, 3, 3), np.float32)
assert m.dynamic_rnn(params, x)[0].shape == (2, 3, 4)
try:
    m.dynamic_rnn(params, x, backend="cuda")
except CudaUnavailable as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install -e .[cuda]" in done.stdout


# -- real compilation ---------------------------------------------------------------------------
#: The tensor-core GEMMs: tests/test_cuda_mma.py compiles them to SASS for both arches (once, not in every
#: (arch, dtype) test below: ~23 s an arch).
MMA_RUNTIME = frozenset({"hoisted_mma_f16", "hoisted_tn_mma_f16", "hoisted_mma_bf16", "hoisted_tn_mma_bf16"})
def test_the_sass_tests_skip_only_the_runtime_kernels_test_cuda_mma_compiles() -> None:
    from test_cuda_mma import MMA_KERNELS

    from cellgen.tools.sass import runtime_kernels

    assert set(MMA_KERNELS) == MMA_RUNTIME
    assert set(runtime_kernels()) > MMA_RUNTIME


#: The kernels a half storage dtype has per cell (forward only; registers on record in docs/gpu.md, "Half precision").
HALF_FORWARD = {"stage0", "stage1", "stage0_all", "stage1_all", "persistent", "scan"}


@pytest.mark.long
@pytest.mark.skipif(SIMULATED, reason="compile_ptx needs the real numba.cuda, not the simulator")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_half_storage_kernels_compile_to_sass_without_spills(arch: str, dtype: str) -> None:
    """Every shipped spec's float16 / bfloat16 storage variants (forward only: no training kernels in half)
    and the hoisted GEMM's storage variant: 0 spill bytes, registers within the hardware's 255; the persistent
    kernels' recurrent GEMMs on tensor cores (HMMA in the SASS: per K tile of MMA_TILE_K, its k16 steps x 2 MMAs, the
    operand's rounded part and remainder, x each warp's column tiles: the chunk's columns / 32)."""
    reports = inspect_specs(SPECS, [arch], [dtype], skip_runtime=MMA_RUNTIME, mix=True)
    kernels = {(r.cell, r.kernel) for r in reports}
    assert ("runtime", "hoisted") in kernels and ("runtime", "hoisted_tn") not in kernels
    assert {k for c, k in kernels if c != "runtime"} == HALF_FORWARD
    stepped = {c for c, k in kernels if k == "persistent"}
    assert stepped == {"basic_lstm", "basic_rnn", "gru", "gru_cudnn", "lstm"}
    assert {(r.arch, r.dtype) for r in reports} == {(arch, dtype)}
    for r in reports:
        assert r.spills == 0, r
        assert r.stack == (16 if r.kernel == "persistent" else 0), r
        assert 0 < r.registers <= 255 and r.occupancy > 0, r
    hmma = {r.cell: r.mix.hmma for r in reports if r.kernel == "persistent"}
    # a gate's column tiles a warp: 1 (32 units / 4 warps of 8 columns); lstm: 4 gates, then the projection's 1
    per_gate = 2 * (MMA_TILE_K // 16)  # a K tile's k16 steps x (rounded part, remainder)
    assert hmma == {"basic_lstm": 4 * per_gate, "basic_rnn": per_gate, "gru": 2 * per_gate + per_gate,
                    "gru_cudnn": 3 * per_gate, "lstm": 4 * per_gate + per_gate}, hmma
    assert not any(r.mix.hmma for r in reports if r.kernel != "persistent" and r.cell != "runtime")

@pytest.mark.long
@pytest.mark.skipif(SIMULATED, reason="compile_ptx needs the real numba.cuda, not the simulator")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])  # one test per (arch, dtype): workers share them out
def test_every_spec_compiles_to_sass_for_sm80_and_sm90_without_spills(arch: str, dtype: str) -> None:
    reports = inspect_specs(SPECS, [arch], [dtype], skip_runtime=MMA_RUNTIME)
    kernels = {(r.cell, r.kernel) for r in reports}
    assert {("runtime", "hoisted"), ("lstm", "stage0"), ("lstm", "stage1"), ("gru", "stage1"),
            ("qrnn", "scan"), ("gru_cudnn", "stage0")} <= kernels
    # the all-rows variants and the persistent kernel of every cell with a recurrent GEMM, plain and training
    stepped = {c for c, k in kernels if k == "stage0"}
    assert stepped == {"basic_lstm", "basic_rnn", "gru", "gru_cudnn", "lstm"}
    for cell in stepped:
        assert {(cell, "stage0_all"), (cell, "persistent"), (cell, "train_persistent")} <= kernels
    assert ("lstm", "stage1_all") in kernels and ("gru", "train_stage1_all") in kernels
    assert not any(k == "hoisted" for c, k in kernels if c != "runtime")  # compiled once, not per cell
    assert not any(k.startswith("epilogue") for _, k in kernels)  # every shipped epilogue is fused
    backward = {(c, k) for c, k in kernels if k.startswith(("backward_stage", "backward_scan"))}  # the fused backward
    assert backward == {("basic_lstm", "backward_stage0"), ("basic_rnn", "backward_stage0"), ("gru", "backward_stage0"),
                        ("gru", "backward_stage1"), ("gru_cudnn", "backward_stage0"), ("lstm", "backward_stage0"),
                        ("lstm", "backward_stage1"), ("qrnn", "backward_scan"), ("qrnn_f", "backward_scan"),
                        ("qrnn_ifo", "backward_scan")}
    assert len(reports) == len(kernels) and {(r.arch, r.dtype) for r in reports} == {(arch, dtype)}
    for r in reports:
        assert r.spills == 0, r
        # the persistent kernel's only stack is the frame of the grid barrier's call (cudadevrt's cudaCGSynchronize)
        assert r.stack == (16 if r.kernel.endswith("persistent") else 0), r
        assert 0 < r.registers <= 255 and r.occupancy > 0, r


# -- numbers, in the simulator ---------------------------------------------------------------------
#: tests/cuda_sim_cases.py runs as this many processes (every SIM_SHARDS-th test each; tests/conftest.py)
SIM_SHARDS = 4
#: The simulator's files and their shards: the float32/float64 cases, the half-precision ones, and the
#: tensor-core GEMM's (the emulated MMA).
SIM_FILES = {"tests/cuda_sim_cases.py": SIM_SHARDS, "tests/cuda_sim_half_cases.py": 3, "tests/cuda_sim_mma_cases.py": 1}


@pytest.mark.long
@pytest.mark.skipif(SIMULATED, reason="this process is already the simulator")
@pytest.mark.parametrize(("path", "shard"), [(p, k) for p, n in SIM_FILES.items() for k in range(n)])
def test_simulator_suite(path: str, shard: int) -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "CELLGEN_TEST_SHARD": f"{shard}/{SIM_FILES[path]}"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    last = done.stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, done.stdout[-2000:]


@pytest.mark.skipif(SIMULATED, reason="this process is already the simulator")
@pytest.mark.parametrize("path", [p for p, n in SIM_FILES.items() if n > 1])
def test_simulator_shards_cover_every_case(path: str) -> None:
    """The shards' union is the whole file, each case once."""
    def collected(shard: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "CELLGEN_TEST_SHARD"} | {"NUMBA_ENABLE_CUDASIM": "1"}
        if shard is not None:
            env["CELLGEN_TEST_SHARD"] = shard
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                               path], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        return [line for line in done.stdout.splitlines() if "::" in line]

    shards = [collected(f"{k}/{SIM_FILES[path]}") for k in range(SIM_FILES[path])]
    assert all(shards) and sorted(sum(shards, [])) == sorted(collected(None))
