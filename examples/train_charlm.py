"""A character-level language model with a cellgen cell, trained in PyTorch (docs/torch.md).

The text is Python's own standard library (its ``*.py`` source files, read from ``sysconfig``'s
``stdlib`` folder: no downloads). The model is ``Embedding -> cellgen.torch.RNN(cell) -> Linear``, trained
with Adam on random windows, with a tqdm progress bar, a validation loss every ``--eval-every`` steps, a
sample of generated text at the end and a PNG loss curve (matplotlib, Agg).

    python examples/train_charlm.py                                  # basic_lstm, 500 steps
    python examples/train_charlm.py --cell specs/qrnn.py --steps 2000
    python examples/train_charlm.py --compare nn.LSTM --plot docs/charlm_loss.png   # the same model, torch's LSTM
    torchrun --nproc_per_node 2 examples/train_charlm.py --ddp       # DistributedDataParallel (gloo; nccl on GPU)

``--cell``: a shipped cell's name (``basic_lstm``, ``qrnn``, ...), a spec file's path, or an importable
generated module (``generated.basic_lstm`` from the repository root). ``--compare nn.LSTM`` (cell
``basic_lstm``) / ``nn.GRU`` (cell ``gru_cudnn``) trains torch's own module from the SAME initial weights
(``RNN.to_torch()``; its ``bias_hh`` stays zero, as the cellgen layer has one bias) on the same batches,
after the cellgen run, and reports both loss curves and steps/s.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import cellgen
import cellgen.torch as cgt

COMPARE = {"nn.LSTM": "basic_lstm", "nn.GRU": "gru_cudnn"}


# -- data --------------------------------------------------------------------------------------------
def stdlib_text(max_chars: int) -> str:
    """The first ``max_chars`` characters of the standard library's top-level ``*.py`` files, sorted by name."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(folder.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    if len(text) < 10_000:
        raise SystemExit(f"train_charlm: found only {len(text)} characters of Python source in {folder}")
    return text


class Corpus:
    """The text as token ids, split 90/10 into training and validation ids."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: k for k, c in enumerate(self.chars)}
        ids = np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))
        cut = int(0.9 * len(ids))
        self.train, self.valid = ids[:cut], ids[cut:]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, ids: np.ndarray, rng: np.random.Generator, batch: int, steps: int) -> tuple[torch.Tensor, ...]:
        """``batch`` random windows: inputs [batch, steps] and the next characters (targets)."""
        starts = rng.integers(0, len(ids) - steps - 1, size=batch)
        window = np.stack([ids[s:s + steps + 1] for s in starts])
        return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[k] for k in ids)


# -- model -------------------------------------------------------------------------------------------
class TorchRNN(nn.Module):
    """torch's nn.LSTM / nn.GRU with the cellgen layer's interface: ``(outputs, state)``, state in TF order."""

    def __init__(self, rnn: nn.Module, state_class: type) -> None:
        super().__init__()
        self.rnn, self.State = rnn, state_class

    def forward(self, x: torch.Tensor, sequence_length: Any = None, initial_state: Any = None) -> tuple[Any, Any]:
        lstm = isinstance(self.rnn, nn.LSTM)
        hx = None
        if initial_state is not None:
            hx = (initial_state.h[None], initial_state.c[None]) if lstm else initial_state.h[None]
        out, hn = self.rnn(x, hx)
        return out, (self.State(hn[1][0], hn[0][0]) if lstm else self.State(hn[0]))


class CharLM(nn.Module):
    def __init__(self, vocab: int, embed: int, rnn: nn.Module, output_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = rnn
        self.head = nn.Linear(output_size, vocab)

    def forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.rnn(self.embed(tokens), initial_state=state)
        return self.head(out), state


def load_cell(cell: str | ModuleType) -> ModuleType:
    """A generated module: as given, an importable module name (``generated.basic_lstm``), or ``cellgen.load``."""
    if isinstance(cell, ModuleType):
        return cell
    if "." in cell and not cell.endswith(".py") and not os.path.exists(cell):
        try:
            module = importlib.import_module(cell)
            if hasattr(module, "dynamic_rnn_vjp"):
                return module
        except ImportError:
            pass
    return cellgen.load(cell)


def build_models(args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, nn.Module]:
    """The cellgen model and, with ``--compare``, torch's, from the same initial weights."""
    torch.manual_seed(args.seed)
    module = load_cell(args.cell)
    sizes = {s: args.hidden for s in module.SIZES}
    backend = "cuda" if device.type == "cuda" else "cpu"
    layer = cgt.RNN(module, args.embed, args.hidden, backend=backend, **sizes)
    models = {f"cellgen {module.NAME}": CharLM(vocab, args.embed, layer, layer.output_size)}
    if args.compare:
        want, got = COMPARE[args.compare], module.NAME
        if got != want:
            raise SystemExit(f"train_charlm: --compare {args.compare} needs --cell {want}, got {got}")
        twin = copy.deepcopy(models[f"cellgen {module.NAME}"])
        rnn = layer.to_torch()
        if isinstance(rnn, nn.LSTM):  # the cellgen layer has one bias (TF's): torch's second one stays zero
            rnn.bias_hh_l0.requires_grad_(False)
        twin.rnn = TorchRNN(rnn, module.State)
        models[args.compare] = twin
    return {name: model.to(device) for name, model in models.items()}


# -- training ----------------------------------------------------------------------------------------
def evaluate(model: nn.Module, corpus: Corpus, args: argparse.Namespace, device: torch.device) -> float:
    rng = np.random.default_rng(12345)  # the same validation windows at every evaluation
    total = 0.0
    with torch.no_grad():
        for _ in range(args.eval_batches):
            x, y = corpus.batch(corpus.valid, rng, args.batch, args.seq_len)
            logits, _ = model(x.to(device))
            total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()))
    return total / args.eval_batches


def sample(model: nn.Module, corpus: Corpus, prompt: str, n: int, temperature: float, device: torch.device,
           seed: int) -> str:
    """``n`` characters after ``prompt``, one step at a time with the state carried."""
    gen = torch.Generator().manual_seed(seed)
    ids = [corpus.index.get(c, 0) for c in prompt]
    with torch.no_grad():
        logits, state = model(torch.tensor([ids], device=device))
        out = []
        for _ in range(n):
            probs = torch.softmax(logits[0, -1].double().cpu() / temperature, dim=0)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
            logits, state = model(torch.tensor([[nxt]], device=device), state)
    return prompt + corpus.decode(out)


def train(name: str, model: nn.Module, corpus: Corpus, args: argparse.Namespace, device: torch.device,
          rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Adam on random windows (each rank its own); the loss curve, validation losses and steps/s."""
    rng = np.random.default_rng(args.seed + 1000 * rank)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    losses, valid = [], []
    bar = tqdm(range(args.steps), desc=name, disable=rank != 0 or args.quiet, dynamic_ncols=True)
    seconds = 0.0
    for step in bar:
        x, y = corpus.batch(corpus.train, rng, args.batch, args.seq_len)
        start = time.perf_counter()
        logits, _ = net(x.to(device))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        opt.step()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            valid.append((step + 1, evaluate(model, corpus, args, device)))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", valid=f"{valid[-1][1]:.3f}")
    return {"loss": losses, "valid": valid, "steps_per_s": args.steps / seconds if seconds else math.inf,
            "train_seconds": seconds}


def plot(results: dict[str, dict[str, Any]], path: str, vocab: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (name, r) in enumerate(results.items()):
        loss = np.asarray(r["loss"])
        window = max(1, min(25, len(loss) // 10))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        color = f"C{k}"
        ax.plot(np.arange(window, len(loss) + 1), smooth, color=color, lw=1.4,
                ls="-" if k == 0 else "--", label=f"{name} train ({r['steps_per_s']:.1f} steps/s)")
        if r["valid"]:
            steps, values = zip(*r["valid"], strict=True)
            ax.plot(steps, values, "o" if k == 0 else "x", color=color, ms=7 if k == 0 else 6,
                    mfc="none" if k == 0 else color, label=f"{name} validation")
    ax.axhline(math.log(vocab), color="gray", lw=0.8, ls=":", label=f"ln(vocab) = {math.log(vocab):.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("character LM on the Python standard library")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", default="basic_lstm", help="shipped cell name, spec path or generated module name")
    p.add_argument("--compare", choices=sorted(COMPARE), help="also train torch's own module from the same init")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--chars", type=int, default=1_000_000, help="characters of standard library source to use")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch and Numba threads (default: theirs)")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel; run under torchrun")
    p.add_argument("--plot", help="write the loss curves to this PNG")
    p.add_argument("--json", help="write the losses, validation losses, steps/s and the sample to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    rank, world = 0, 1
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    corpus = Corpus(stdlib_text(args.chars))
    models = build_models(args, corpus.vocab, device)
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        results[name] = train(name, model, corpus, args, device, rank, world)
    report: dict[str, Any] = {"vocab": corpus.vocab, "chars": len(corpus.train) + len(corpus.valid), "world": world,
                              "args": vars(args), "results": results}
    if rank == 0:
        name, model = next(iter(models.items()))
        report["sample"] = sample(model, corpus, args.prompt, args.sample_chars, args.temperature, device, args.seed)
        for name, r in results.items():
            print(f"{name}: final train loss {np.mean(r['loss'][-20:]):.3f}, validation {r['valid'][-1][1]:.3f} "
                  f"(ln(vocab={corpus.vocab}) = {math.log(corpus.vocab):.3f}), {r['steps_per_s']:.1f} steps/s"
                  + (f" per process, {world} processes" if world > 1 else ""))
        if len(results) == 2:
            a, b = (np.asarray(r["loss"]) for r in results.values())
            print(f"max |train loss difference| {np.max(np.abs(a - b)):.2e} over {len(a)} steps")
        print("sample:\n" + report["sample"])
        if args.plot:
            plot(results, args.plot, corpus.vocab)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
