"""`cellgen bench` runs end to end and merges its rounds (no timing is asserted: see
docs/performance.md; these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cellgen.tools.bench import Result, merge_rounds

REPO = Path(__file__).resolve().parent.parent


def test_merge_rounds_takes_the_best_of_every_round() -> None:
    a = Result("s", "S1", (1, 2, 3, 4), {"cellgen": {"best": 3.0, "median": 4.0},
                                          "torch": {"best": 1.0, "median": 2.0}})
    b = Result("s", "S1", (1, 2, 3, 4), {"cellgen": {"best": 2.0, "median": 6.0},
                                          "torch": {"best": 5.0, "median": 5.0}})
    merged = merge_rounds([a, b])
    assert merged.times["cellgen"] == {"best": 2.0, "median": 5.0}
    assert merged.times["torch"] == {"best": 1.0, "median": 3.5}
    assert merged.notes["rounds_best"] == {"cellgen": [3.0, 2.0], "torch": [1.0, 5.0]}
    assert merged.ratio("cellgen", "torch") == 2.0


def test_bench_command_writes_every_implementation(tmp_path: Path) -> None:
    target = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "cellgen.cli", "bench", "specs/basic_rnn.py", "--shape", "3,4,5,8", "--repeat", "2",
           "--warmup", "1", "--rounds", "2", "--no-torch", "--json", str(target)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "basic_rnn" in proc.stdout and "kernel floor" in proc.stdout
    (result,) = json.loads(target.read_text())["results"]
    assert result["sizes"] == [3, 4, 5, 8]
    assert set(result["times"]) == {"cellgen", "kernel floor", "BLAS floor", "reference"}
    assert all(len(v) == 2 for v in result["notes"]["rounds_best"].values())
    rounds = result["notes"]["rounds_best"]
    for name, t in result["times"].items():  # the best of all rounds, never above a round's median
        assert t["best"] == min(rounds[name]) and 0 < t["best"] <= t["median"], (name, t, rounds[name])


def test_bench_rejects_a_bad_rounds_value() -> None:
    proc = subprocess.run([sys.executable, "-m", "cellgen.cli", "bench", "specs/basic_rnn.py", "--rounds", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--rounds" in proc.stderr and "positive integer" in proc.stderr
