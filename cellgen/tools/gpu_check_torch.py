"""``cellgen gpu-check`` against cuDNN: ``torch.nn.LSTM`` / ``GRU`` with cellgen's weights, TF32 off.

basic_lstm is ``nn.LSTM`` and gru_cudnn is ``nn.GRU`` equation for equation
(:data:`cellgen.tools.bench_torch.TORCH_CELLS`); both are run, float32, at the issue's B64 T100
H256 and B16 T1024 H768 (``--quick``: tiny), full lengths and zero initial states (cuDNN's
unpacked layout): the forward's outputs, and the training step's inputs gradient of a random
linear loss. Without torch, or where torch sees no GPU, one "skipped" row says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cellgen.backends.cuda import runtime as rtc
from cellgen.tools.bench_torch import TORCH_CELLS, torch_rnn
from cellgen.tools.gpu_check_cases import Check, max_diff, rel_error, status

SHAPES = {"B64 T100 H256": (64, 100, 256, 256), "B16 T1024 H768": (16, 1024, 768, 768)}
QUICK_SHAPES = {"B2 T3 H4": (2, 3, 4, 4)}
#: Largest |cellgen - cuDNN| of the outputs, and relative error of the inputs gradient (float32).
TOL, GRAD_TOL = 1e-4, 1e-3


def _unavailable() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def torch_checks(load: Callable, quick: bool) -> list[Check]:
    """Forward and inputs-gradient rows per (cell, shape), or one skipped row."""
    why = _unavailable()
    if why is not None:
        return [Check("cuDNN", "basic_lstm, gru_cudnn", "float32", "-", "torch.nn.LSTM / GRU on cuDNN", None, None,
                      "skipped", why)]
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    checks = []
    for name, kind in TORCH_CELLS.items():
        for label, shape in (QUICK_SHAPES if quick else SHAPES).items():
            checks += _compare(load(name), kind, label, shape, torch)
    return checks


def _compare(module, kind: str, label: str, shape: tuple[int, int, int, int], torch) -> list[Check]:
    batch, steps, isize, units = shape
    rng = np.random.default_rng(5)
    params = module.init_params(isize, units, dtype=np.float32, seed=5)
    inputs = rng.standard_normal((batch, steps, isize)).astype(np.float32)
    weights = rng.standard_normal((batch, steps, units)).astype(np.float32)
    (out, _), backward = module.dynamic_rnn_vjp(params, inputs, backend="cuda")
    d_inputs = rtc.to_host(backward(weights).inputs)
    net = torch_rnn(torch, kind, params, isize, units, float(module.HYPER.get("forget_bias", 0.0)),
                    batch_first=True).cuda()
    x = torch.from_numpy(inputs).cuda().requires_grad_(True)
    y = net(x)[0]
    (y * torch.from_numpy(weights).cuda()).sum().backward()
    diff = max_diff(out, y.detach().cpu().numpy())
    grad = rel_error(d_inputs, x.grad.cpu().numpy())
    return [Check("cuDNN", module.NAME, "float32", label, f"forward vs torch.nn.{kind}", diff, TOL,
                  status(diff, TOL)),
            Check("cuDNN", module.NAME, "float32", label, f"inputs gradient vs torch.nn.{kind} (relative)", grad,
                  GRAD_TOL, status(grad, GRAD_TOL))]
