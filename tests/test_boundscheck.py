"""Issue 9 §1: every shipped spec runs with Numba's bounds checking on, on the one-thread loop
and on the parallel layouts, and gives the reference backend's numbers; a spec with a size
relation (``cell.input(size=NUM_UNITS)``) too. An out-of-bounds read or write in a kernel
raises IndexError there instead of reading a neighbour's row.

Bounds checking is a process-wide Numba setting read at import, and compiled code is cached
by signature, so the checks run in a child process with its own NUMBA_CACHE_DIR.
"""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import importlib, sys
    import numpy as np
    from numba.core import config
    assert config.BOUNDSCHECK, "NUMBA_BOUNDSCHECK is not on"
    from numba import njit
    try:  # the check can fail: an out-of-bounds read raises here
        njit(lambda a: a[3])(np.zeros(3))
        raise SystemExit("bounds checking did not catch a[3] of a 3-vector")
    except IndexError:
        pass
    from pathlib import Path
    from cellgen.build import build
    from cellgen.backends.cpu import gemm

    root, specs = sys.argv[1], sys.argv[2:]
    build(specs, Path(root) / "gen_bc")
    sys.path.insert(0, root)
    rng = np.random.default_rng(0)
    for spec in specs:
        name = spec.rsplit("/", 1)[-1][:-3]
        m = importlib.import_module("gen_bc." + name)
        units = 5
        width = units if name == "highway" else 3
        sizes = {"num_proj": 2} if name == "lstm" else {}
        p = m.init_params(width, units, seed=1, **sizes)
        for batch, threads in ((3, 1), (26, 2), (1, 2)):
            for knob in ("PARALLEL_WORK", "STEP_PARALLEL_WORK"):
                setattr(gemm, knob, 0 if threads == 2 else 1 << 62)
            xs = rng.standard_normal((batch, 7, width)).astype(np.float32)
            lengths = rng.integers(0, 8, size=batch)
            lengths[0] = 7
            got = m.dynamic_rnn(p, xs, sequence_length=lengths)
            want = m.dynamic_rnn(p, xs, sequence_length=lengths, backend="reference")
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
            for a, b in zip(got[1], want[1]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        print("ok", name, flush=True)
""")

HIGHWAY = """from cellgen.dsl import Cell, NUM_UNITS, sigmoid, tanh
cell = Cell("highway")
x = cell.input(size=NUM_UNITS)
c = cell.state("c")
z, f, r = cell.linear([x], gates=("z", "f", "r"), kernel="kernel", bias="bias")
cell.update(c, sigmoid(f) * c + (1 - sigmoid(f)) * z)
cell.output(sigmoid(r) * tanh(cell.updated(c)) + (1 - sigmoid(r)) * x)
"""


@pytest.mark.long
def test_every_shipped_spec_runs_bounds_checked(tmp_path: Path) -> None:
    (tmp_path / "highway.py").write_text(HIGHWAY)
    specs = [str(p) for p in sorted((REPO / "specs").glob("*.py"))] + [str(tmp_path / "highway.py")]
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *specs], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.split() == [w for s in specs for w in ("ok", Path(s).stem)]
