"""`cellgen bench` helper: time ``torch.nn.LSTM`` / ``torch.nn.GRU`` in a process of its own.

Run as ``python -m cellgen.tools.bench_torch JOB.npz``; prints one JSON line. torch is never
imported next to Numba's OpenMP threading layer: loaded together, libgomp slowed torch's
GRU sixfold here (docs/performance.md), and the comparison would not be honest.

The job file holds the cellgen parameters, the input and cellgen's output; the worker
converts the weights to torch's layout (same weights), runs under ``torch.no_grad()`` with
the requested thread count, and reports best/median times and the largest difference from
cellgen's output.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

#: cellgen spec -> the torch module with the same equations.
TORCH_CELLS = {"basic_lstm": "LSTM", "gru_cudnn": "GRU"}


def _lstm_weights(params: dict[str, np.ndarray], input_size: int, num_units: int, forget_bias: float):
    """TF BasicLSTMCell kernel [I+H, 4H] (i, j, f, o) -> torch (i, f, g, o) weights and biases."""
    h = num_units
    kernel, bias = params["kernel"], params["bias"].copy()
    bias[2 * h:3 * h] += forget_bias
    order = np.r_[0:h, 2 * h:3 * h, h:2 * h, 3 * h:4 * h]
    w = kernel[:, order]
    return w[:input_size].T, w[input_size:].T, bias[order], np.zeros_like(bias)


def _gru_weights(params: dict[str, np.ndarray], input_size: int, num_units: int, forget_bias: float):
    """cuDNN GRU (r, z, n), PyTorch's layout already: transpose the kernels."""
    return (params["input/kernel"].T, params["recurrent/kernel"].T, params["input/bias"],
            params["recurrent/bias"])


_CONVERT = {"LSTM": _lstm_weights, "GRU": _gru_weights}


def time_torch(job: str) -> dict[str, float | str]:
    """Load a job file, build the torch module with cellgen's weights, time forward calls."""
    import torch

    data = np.load(job)
    kind = str(data["kind"])
    threads, repeat, warmup = (int(data[k]) for k in ("threads", "repeat", "warmup"))
    torch.set_num_threads(threads)
    x = data["inputs"]
    input_size, num_units = x.shape[2], int(data["num_units"])
    params = {k[len("param:"):]: data[k] for k in data.files if k.startswith("param:")}
    w_ih, w_hh, b_ih, b_hh = _CONVERT[kind](params, input_size, num_units, float(data["forget_bias"]))
    module = getattr(torch.nn, kind)(input_size, num_units, batch_first=True)
    with torch.no_grad():
        for name, value in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", b_ih),
                            ("bias_hh_l0", b_hh)):
            getattr(module, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
        inputs = torch.from_numpy(x)
        for _ in range(warmup):
            out, _ = module(inputs)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out, _ = module(inputs)
            times.append(time.perf_counter() - start)
    diff = float(np.abs(out.numpy() - data["expected"]).max(initial=0.0))
    return {"best": min(times), "median": float(np.median(times)), "max_abs_diff": diff,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "mkldnn": bool(torch.backends.mkldnn.is_available())}


if __name__ == "__main__":
    print(json.dumps(time_torch(sys.argv[1])))
