"""The CPU kernels' threading layout: identical results whatever the thread counts.

Each configuration runs in its own process (thread pools are fixed at start-up): Numba's
thread count (NUMBA_NUM_THREADS) and the BLAS pools (OPENBLAS/OMP_NUM_THREADS) set
differently. The kernels never call BLAS inside the time loop and every output element is
summed in the same order on any thread split, so the outputs must match bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellgen.build import build

REPO = Path(__file__).resolve().parent.parent
SPECS = ("basic_lstm", "gru_cudnn", "gru", "qrnn")
CONFIGS = {  # name -> environment
    "numba1_blas2": {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"},
    "numba2_blas1": {"NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "numba2_blas2": {"NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"},
    "numba3_blas1": {"NUMBA_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
}

_CHILD = """
import sys, numpy as np, numba
sys.path.insert(0, {root!r})
from cellgen.backends.cpu import gemm
out = {{}}
for name in {specs!r}:
    mod = __import__("gen_threads." + name, fromlist=["x"])
    rng = np.random.default_rng(0)
    batch, steps, isize, units = 24, 45, 96, 128  # parallel path; hoisted GEMM in several blocks
    params = mod.init_params(isize, units, seed=1)
    x = rng.standard_normal((batch, steps, isize)).astype(np.float32)
    lengths = rng.integers(0, steps + 1, size=batch)
    o, s = mod.dynamic_rnn(params, x, sequence_length=lengths)
    out[name] = o
    for k, v in enumerate(s):
        out[f"{{name}}_state{{k}}"] = v
    if name == "qrnn":  # a scan's work is its whole call: T=200 takes its fused parallel path
        x = rng.standard_normal((batch, 200, isize)).astype(np.float32)
        lengths = rng.integers(0, 201, size=batch)
        o, s = mod.dynamic_rnn(params, x, sequence_length=lengths)
        out["qrnn_long"] = o
        out["qrnn_long_state0"] = s[0]
out["threads"] = np.array([numba.get_num_threads(), gemm.threads_for(24, 128 * 512)])
np.savez({target!r}, **out)
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("threads")
    build([str(REPO / "specs" / f"{n}.py") for n in SPECS], root / "gen_threads")
    return root


def _run(root: Path, name: str, env: dict[str, str]) -> dict[str, np.ndarray]:
    target = root / f"{name}.npz"
    full = dict(os.environ, NUMBA_CACHE_DIR=str(root / "numba-cache"), **env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full.get("PYTHONPATH")]))
    code = _CHILD.format(root=str(root), specs=SPECS, target=str(target))
    subprocess.run([sys.executable, "-c", code], env=full, check=True, timeout=600)
    with np.load(target) as data:
        return dict(data)


@pytest.mark.long
def test_results_do_not_depend_on_thread_counts(package: Path) -> None:
    runs = {name: _run(package, name, env) for name, env in CONFIGS.items()}
    assert runs["numba1_blas2"]["threads"].tolist() == [1, 1]  # serial path
    assert runs["numba2_blas1"]["threads"].tolist() == [2, 2]  # prange path
    assert runs["numba3_blas1"]["threads"].tolist() == [3, 3]  # more threads than cores
    base = runs["numba1_blas2"]
    for name, run in runs.items():
        for key in base:
            if key != "threads":
                np.testing.assert_array_equal(run[key], base[key], err_msg=f"{key} under {name}")
