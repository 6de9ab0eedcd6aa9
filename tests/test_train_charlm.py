"""``examples/train_charlm.py``: a few hundred steps of a tiny character LM on the standard library's source.

One run (a subprocess, as a user runs it) trains the cellgen ``basic_lstm`` model and, with ``--compare
nn.LSTM``, torch's LSTM from the same initial weights on the same batches. The untrained model's loss is
ln(vocab) (uniform predictions); after 300 steps the loss must be far below it (a model that learned
the characters' frequencies and more), both curves must coincide, and the PNG, the JSON report and a
sample of generated text must be there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def test_train_charlm_learns_and_matches_nn_lstm(tmp_path: Path) -> None:
    plot, report = tmp_path / "loss.png", tmp_path / "report.json"
    args = ["--cell", "generated.basic_lstm", "--compare", "nn.LSTM", "--steps", "300", "--batch", "16",
            "--seq-len", "32", "--embed", "16", "--hidden", "64", "--chars", "200000", "--eval-every", "100",
            "--sample-chars", "60", "--threads", "1", "--quiet", "--plot", str(plot), "--json", str(report)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_charlm.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    bound = math.log(data["vocab"])
    assert data["vocab"] > 50 and data["chars"] == 200000
    ours, theirs = data["results"]["cellgen basic_lstm"], data["results"]["nn.LSTM"]
    for r in (ours, theirs):
        loss = np.asarray(r["loss"])
        assert len(loss) == 300 and abs(loss[0] - bound) < 0.3, "the untrained model predicts ~uniformly"
        assert np.mean(loss[-20:]) < 0.65 * bound, f"train loss {np.mean(loss[-20:]):.3f} vs ln(vocab) {bound:.3f}"
        assert [s for s, _ in r["valid"]] == [100, 200, 300] and r["valid"][-1][1] < 0.65 * bound
        assert r["steps_per_s"] > 0
    assert np.max(np.abs(np.asarray(ours["loss"]) - np.asarray(theirs["loss"]))) < 1e-3, "same init, same curve"
    assert data["sample"].startswith("def ") and len(data["sample"]) == 64
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "max |train loss difference|" in proc.stdout
