"""``cellgen.torch`` under ``torch.nn.parallel.DistributedDataParallel`` (gloo, 2 processes on 127.0.0.1).

* One SGD step of a model with cellgen layers (a ``MultiRNN`` of basic_lstm and qrnn, ragged lengths)
  on 2 processes, each with half of the batch, leaves every parameter equal (float64, 1e-10) to one
  step of the same model in this process on the whole batch: DDP averages the ranks' gradients, and
  the layer needs nothing from DDP but autograd and its parameters.
* ``examples/train_charlm.py --ddp`` runs under ``torchrun --nproc_per_node 2``.
"""

from __future__ import annotations

import pytest

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
BATCH, STEPS, IN, H = 6, 5, 3, 4
LR = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Model(torch.nn.Module):
    """A MultiRNN of two cellgen cells and a linear head; the loss of a batch is its forward."""

    def __init__(self) -> None:
        import generated.basic_lstm as basic_lstm
        import generated.qrnn as qrnn

        import cellgen.torch as ct

        super().__init__()
        self.rnn = ct.MultiRNN([ct.RNN(basic_lstm, IN, H, dtype=torch.float64),
                                ct.RNN(qrnn, H, H, dtype=torch.float64)])
        self.head = torch.nn.Linear(H, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the rows of each row's squared error: the ranks' mean of it is the whole batch's."""
        out, states = self.rnn(x, lengths)
        return ((self.head(out) - target) ** 2).sum(dim=(1, 2)).mean() + states[1].c.square().sum(dim=1).mean()


def make_model() -> Model:
    torch.manual_seed(0)
    return Model()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, STEPS, IN, generator=gen, dtype=torch.float64)
    target = torch.randn(BATCH, STEPS, 2, generator=gen, dtype=torch.float64)
    return x, torch.tensor([5, 3, 0, 5, 1, 4]), target


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(make_model())
        x, lengths, target = data()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model(x[rows], lengths[rows], target[rows]).backward()  # through DDP's forward: its reducer's hooks
        opt.step()
        torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.long
def test_one_ddp_sgd_step_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model(*data()).backward()
    opt.step()
    want = model.state_dict()
    assert "rnn.cell_0/kernel" in want and "rnn.cell_1/kernel" in want
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == list(want)
        for key, value in want.items():
            assert not torch.equal(value, before[key]), f"{key} did not move"
            err = float((got[key] - value).abs().max())
            assert err <= 1e-10 * max(1.0, float(value.abs().max())), f"rank {rank} {key}: {err:.3g}"


@pytest.mark.long
def test_train_charlm_runs_under_torchrun_ddp(tmp_path: Path) -> None:
    report = tmp_path / "ddp.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "examples" / "train_charlm.py"), "--ddp", "--cell",
           "generated.basic_lstm", "--steps", "20", "--batch", "8", "--seq-len", "16", "--embed", "8", "--hidden",
           "16", "--chars", "50000", "--eval-every", "10", "--sample-chars", "10", "--quiet", "--json", str(report)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    import json

    data = json.loads(report.read_text())
    assert data["world"] == 2 and len(data["results"]["cellgen basic_lstm"]["loss"]) == 20
