"""`cellgen bench` runs end to end and merges its rounds (no timing is asserted: see
docs/performance.md; these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cellgen.tools.bench_common import Result, merge_rounds

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


def test_train_products_follow_the_plan() -> None:
    """The training floor's GEMMs: the reverse loop's transposed products, last stage first; one
    weight GEMM per stage; T+1 rows of x and d_pre after the loop where there is a delay state."""
    from cellgen.build import compile_spec
    from cellgen.tools.bench_floor import train_products

    _, plan = compile_spec(REPO / "specs" / "lstm.py")
    p = train_products(plan, 4, 7, {"input_size": 5, "num_units": 6, "num_proj": 3})
    assert p.forward.hoisted == (5, 24) and p.forward.recurrent == ((3, 24), (6, 3))
    assert p.transposed == ((3, 6), (24, 3))  # drec1 = dg1 @ W_proj^T first, then drec0 = dg0 @ W_h^T
    assert p.weight_grads == ((3, 24), (6, 3)) and p.hoisted_rows == 28
    _, plan = compile_spec(REPO / "specs" / "qrnn.py")
    p = train_products(plan, 4, 7, {"input_size": 5, "num_units": 6})
    assert p.forward.hoisted == (5, 36) and p.transposed == () and p.weight_grads == ()
    assert p.hoisted_rows == 32  # x_{-1} and the T inputs


@pytest.mark.long
def test_bench_train_reports_every_column_and_torch_agrees(tmp_path: Path) -> None:
    """`--train` on a tiny shape: every timed part is there and torch (nn.LSTM, nn.GRU, the eager
    lstm and qrnn loops) computes the same outputs and gradients as cellgen."""
    pytest.importorskip("torch")
    target = tmp_path / "train.json"
    specs = [f"specs/{name}.py" for name in ("basic_lstm", "gru_cudnn", "lstm", "qrnn")]
    cmd = [sys.executable, "-m", "cellgen.cli", "bench", *specs, "--train", "--shape", "3,6,5,8", "--repeat", "1",
           "--warmup", "1", "--json", str(target)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "training step" in proc.stdout and "where the time goes" in proc.stdout
    data = json.loads(target.read_text())
    assert data["mode"] == "train" and data["recompute"] is False
    impls = {r["spec"]: r for r in data["results"]}
    assert set(impls) == {"basic_lstm", "gru_cudnn", "lstm", "qrnn"}
    kinds = {"basic_lstm": "torch.nn.LSTM", "gru_cudnn": "torch.nn.GRU", "lstm": "eager torch loop (lstm)",
             "qrnn": "eager torch loop (qrnn)"}
    for name, r in impls.items():
        assert set(r["times"]) == {"cellgen", "kernel floor", "torch", "cellgen fwd", "vjp fwd", "floor fwd",
                                   "floor rev loop", "floor after loop"}, name
        assert all(0 < t["best"] <= t["median"] for t in r["times"].values()), name
        torch = r["notes"]["torch"]
        assert torch["impl"] == kinds[name]
        assert torch["max_abs_diff"] < 1e-5, (name, torch)
        assert torch["d_inputs_max_abs_diff"] < 1e-4 * max(1.0, torch["d_inputs_max_abs"]), (name, torch)
        assert torch["d_params_max_rel_diff"] < 1e-4 and torch["d_params_diffs"], (name, torch)
    assert impls["lstm"]["notes"]["sizes"]["num_proj"] == 8  # min(128, H)
    assert impls["lstm"]["notes"]["hyper"] == {"cell_clip": 3.0, "proj_clip": 3.0}
    assert set(impls["lstm"]["notes"]["torch"]["d_params_diffs"]) == {
        "kernel", "bias", "projection/kernel", "w_f_diag", "w_i_diag", "w_o_diag"}


def test_bench_train_recompute_is_passed_through(tmp_path: Path) -> None:
    target = tmp_path / "train.json"
    cmd = [sys.executable, "-m", "cellgen.cli", "bench", "specs/basic_lstm.py", "--train", "--recompute", "--shape",
           "2,5,3,4", "--repeat", "1", "--warmup", "0", "--no-torch", "--json", str(target)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(target.read_text())
    (result,) = data["results"]
    assert data["recompute"] is True and result["notes"]["recompute"] is True
    assert "torch" not in result["times"] and "kernel floor" in result["times"]


def test_bench_recompute_needs_train() -> None:
    proc = subprocess.run([sys.executable, "-m", "cellgen.cli", "bench", "specs/basic_rnn.py", "--recompute"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--recompute needs --train" in proc.stderr
