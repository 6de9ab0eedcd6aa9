"""The CUDA backend without a GPU: plan facts, real SASS for sm_80/sm_90, and the simulator suite.

* facts: which GEMMs fuse their epilogue, gate interleaving, GPU double-buffering;
* compilation: every shipped spec's kernels through NVVM + nvJitLink, 0 spill bytes;
* numbers: ``cuda_sim_cases.py`` in a fresh process with ``NUMBA_ENABLE_CUDASIM=1`` (numba
  chooses the simulator when numba.cuda is first imported, so it cannot share this process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellgen.build import compile_spec
from cellgen.tools.sass import inspect_specs, occupancy, parse_log
from cellgen.backends.cuda.context import gate_of, gpu_double_buffered, stage_layouts
from cellgen.backends.cuda.runtime import interleave

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
@pytest.mark.skipif(SIMULATED, reason="compile_ptx needs the real numba.cuda, not the simulator")
def test_every_spec_compiles_to_sass_for_sm80_and_sm90_without_spills() -> None:
    reports = inspect_specs(SPECS, ["sm_80", "sm_90"], ["float32", "float64"])
    kernels = {(r.cell, r.kernel) for r in reports}
    assert {("lstm", "hoisted"), ("lstm", "stage0"), ("lstm", "stage1"), ("gru", "stage1"),
            ("qrnn", "scan"), ("gru_cudnn", "stage0")} <= kernels
    assert not any(k.startswith("epilogue") for _, k in kernels)  # every shipped epilogue is fused
    assert len(reports) == len(kernels) * 4
    for r in reports:
        assert r.spills == 0 and r.stack == 0, r
        assert 0 < r.registers <= 255 and r.occupancy > 0, r


# -- numbers, in the simulator ---------------------------------------------------------------------
@pytest.mark.skipif(SIMULATED, reason="this process is already the simulator")
def test_simulator_suite() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda_sim_cases.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
