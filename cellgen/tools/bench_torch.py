"""`cellgen bench` helper: time ``torch.nn.LSTM`` / ``torch.nn.GRU`` in a process of its own.

Run as ``python -m cellgen.tools.bench_torch JOB.npz``; prints one JSON line. torch is never
imported next to Numba's OpenMP threading layer: loaded together, libgomp slowed torch's
GRU sixfold here (docs/performance.md), and the comparison would not be honest.

The job file holds the cellgen parameters, the input and cellgen's output; the worker
converts the weights to torch's layout (same weights), runs under ``torch.no_grad()`` with
the requested thread count, and reports best/median times and the largest difference from
cellgen's output.

With ``train`` in the job (``cellgen bench --train``) it times a training step instead: the
forward and ``outputs.sum().backward()``, with ``requires_grad`` on the weights and the inputs,
and reports the largest differences of the outputs, of the inputs' gradient and of the
parameters' gradients (in TF names) from cellgen's. For the cells torch does not ship, ``lstm``
(TF 1.x ``LSTMCell``: peepholes, ``cell_clip``, ``num_proj``, ``proj_clip``) and ``qrnn``
(fo-pooling, window 2), it trains an **eager loop** of torch ops written here from the published
equations (:func:`eager_lstm`, :func:`eager_qrnn`), as a user of torch would write them.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

#: cellgen spec -> the torch module with the same equations.
TORCH_CELLS = {"basic_lstm": "LSTM", "gru_cudnn": "GRU"}
#: cellgen spec -> an eager torch loop of this module with the same equations (``--train``).
EAGER_CELLS = {"lstm": "eager_lstm", "qrnn": "eager_qrnn"}


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


def torch_rnn(torch, kind: str, params: dict[str, np.ndarray], input_size: int, num_units: int,
              forget_bias: float, **options):
    """``torch.nn.<kind>`` (LSTM or GRU; ``options`` such as ``batch_first``) holding cellgen's TF-layout
    ``params``: gate order and ``forget_bias`` converted (:func:`_lstm_weights`, :func:`_gru_weights`)."""
    module = getattr(torch.nn, kind)(input_size, num_units, **options)
    with torch.no_grad():
        for name, value in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
                               _CONVERT[kind](params, input_size, num_units, forget_bias), strict=True):
            getattr(module, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return module


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
    module = torch_rnn(torch, kind, params, input_size, num_units, float(data["forget_bias"]), batch_first=True)
    with torch.no_grad():
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


# -- training (cellgen bench --train) -------------------------------------------------------------
def eager_lstm(p, x, forget_bias: float, cell_clip: float, proj_clip: float):
    """TF 1.x ``LSTMCell(use_peepholes=True, cell_clip, num_proj, proj_clip)`` as an eager loop.

    ``p``: TF names -> tensors (``kernel`` [I+P, 4H] with gate columns i, j, f, o, ``bias``,
    ``projection/kernel`` [H, P], ``w_f_diag``/``w_i_diag``/``w_o_diag`` [H]); ``x`` [B, T, I];
    zero initial state; returns the outputs [B, T, P]. The input projection is hoisted (one
    matmul over all steps, time-major); each step is one matmul for the recurrent part, the
    gates, the peepholes and clips, and the projection's matmul (Hochreiter & Schmidhuber 1997;
    peepholes: Gers & Schmidhuber 2000; projection: Sak et al. 2014; TF's rnn_cell_impl.py)::

        i, j, f, o = x @ W_x + h @ W_h + b
        c = sigmoid(f + forget_bias + w_f_diag * c) * c + sigmoid(i + w_i_diag * c) * tanh(j)
        c = clip(c, +-cell_clip);  m = sigmoid(o + w_o_diag * c) * tanh(c)
        h = clip(m @ W_proj, +-proj_clip)
    """
    import torch

    batch, steps, inputs = x.shape
    kernel, w_proj = p["kernel"], p["projection/kernel"]
    units, proj = w_proj.shape
    w_x, w_h = kernel[:inputs], kernel[inputs:]
    pre = torch.addmm(p["bias"], x.transpose(0, 1).reshape(steps * batch, inputs), w_x).view(steps, batch, -1)
    c = x.new_zeros(batch, units)
    h = x.new_zeros(batch, proj)
    w_f, w_i, w_o = p["w_f_diag"], p["w_i_diag"], p["w_o_diag"]
    outputs = []
    for t in range(steps):
        i, j, f, o = torch.addmm(pre[t], h, w_h).chunk(4, dim=1)
        c = torch.sigmoid(f + forget_bias + w_f * c) * c + torch.sigmoid(i + w_i * c) * torch.tanh(j)
        if math.isfinite(cell_clip):
            c = torch.clamp(c, -cell_clip, cell_clip)
        m = torch.sigmoid(o + w_o * c) * torch.tanh(c)
        h = m @ w_proj
        if math.isfinite(proj_clip):
            h = torch.clamp(h, -proj_clip, proj_clip)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def eager_qrnn(p, x):
    """QRNN with fo-pooling and a convolution window of 2 (Bradbury et al. 2016, arXiv:1611.01576)
    as an eager loop: ``p`` TF names -> tensors (``kernel`` [2I, 3H]: rows for x_t then x_{t-1},
    gate columns z, f, o; ``bias`` [3H]); ``x`` [B, T, I], x_{-1} = 0; returns [B, T, H].

    The window-2 convolution is ONE matmul over all steps (``[x_t, x_{t-1}] @ kernel + bias``),
    the gates' activations are computed for all steps at once, and only the fo-pooling runs per
    step (``c = f * c + (1 - f) * z``, as the authors' PyTorch ForgetMult does on the CPU)::

        z = tanh(Z), f = sigmoid(F), o = sigmoid(O);  c_t = f_t * c_{t-1} + (1 - f_t) * z_t;  h_t = o_t * c_t
    """
    import torch

    batch, steps, inputs = x.shape
    xt = x.transpose(0, 1)  # time-major
    x_prev = torch.cat([xt.new_zeros(1, batch, inputs), xt[:-1]], dim=0)
    window = torch.cat([xt, x_prev], dim=2).reshape(steps * batch, 2 * inputs)
    z, f, o = torch.addmm(p["bias"], window, p["kernel"]).view(steps, batch, -1).chunk(3, dim=2)
    f = torch.sigmoid(f)
    fz = (1 - f) * torch.tanh(z)
    c = x.new_zeros(batch, fz.shape[2])
    cs = []
    for t in range(steps):
        c = torch.addcmul(fz[t], f[t], c)
        cs.append(c)
    return (torch.sigmoid(o) * torch.stack(cs, dim=0)).transpose(0, 1)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))


def train_torch(job: str) -> dict[str, object]:
    """A training step (forward + ``outputs.sum().backward()``) of the job's torch cell, timed."""
    import torch

    data = np.load(job)
    kind = str(data["kind"])
    threads, repeat, warmup = (int(data[k]) for k in ("threads", "repeat", "warmup"))
    torch.set_num_threads(threads)
    x_np = data["inputs"]
    input_size, num_units = x_np.shape[2], int(data["num_units"])
    params = {k[len("param:"):]: data[k] for k in data.files if k.startswith("param:")}
    expected_grads = {k[len("grad:"):]: data[k] for k in data.files if k.startswith("grad:")}
    hyper = {k[len("hyper:"):]: float(data[k]) for k in data.files if k.startswith("hyper:")}
    x = torch.from_numpy(np.array(x_np)).requires_grad_(True)
    if kind in _CONVERT:
        module = torch_rnn(torch, kind, params, input_size, num_units, hyper.get("forget_bias", 0.0),
                           batch_first=True)
        leaves = list(module.parameters())

        def forward():
            return module(x)[0]

        def tf_grads() -> dict[str, np.ndarray]:
            return _nn_grads_to_tf(kind, module, input_size, num_units)
        label = f"torch.nn.{kind}"
    else:
        tensors = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in params.items()}
        leaves = list(tensors.values())
        if kind == "eager_lstm":
            def forward():
                return eager_lstm(tensors, x, hyper.get("forget_bias", 1.0), hyper.get("cell_clip", math.inf),
                                  hyper.get("proj_clip", math.inf))
        elif kind == "eager_qrnn":
            def forward():
                return eager_qrnn(tensors, x)
        else:
            raise ValueError(f"unknown torch cell {kind!r}")

        def tf_grads() -> dict[str, np.ndarray]:
            return {k: v.grad.numpy() for k, v in tensors.items()}
        label = f"eager torch loop ({kind[len('eager_'):]})"

    def step():
        for leaf in leaves:
            leaf.grad = None
        x.grad = None
        out = forward()
        out.sum().backward()
        return out

    for _ in range(max(warmup, 3)):  # torch's first two training steps here ran 10-100x slower (lazy set-up)
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
    grads = tf_grads()
    param_diffs = {k: _max_diff(grads[k], v) for k, v in expected_grads.items() if k in grads}
    param_rel = {k: d / max(float(np.abs(expected_grads[k]).max(initial=0.0)), 1e-30) for k, d in param_diffs.items()}
    return {"best": min(times), "median": float(np.median(times)), "impl": label,
            "max_abs_diff": _max_diff(out.detach().numpy(), data["expected"]),
            "d_inputs_max_abs_diff": _max_diff(x.grad.numpy(), data["expected_d_inputs"]),
            "d_inputs_max_abs": float(np.abs(data["expected_d_inputs"]).max(initial=0.0)),
            "d_params_max_abs_diff": max(param_diffs.values(), default=0.0), "d_params_diffs": param_diffs,
            "d_params_max_rel_diff": max(param_rel.values(), default=0.0),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "mkldnn": bool(torch.backends.mkldnn.is_available())}


def _nn_grads_to_tf(kind: str, module, input_size: int, num_units: int) -> dict[str, np.ndarray]:
    """torch.nn.LSTM/GRU parameter gradients as gradients of cellgen's TF-named parameters."""
    g = {name: p.grad.numpy() for name, p in module.named_parameters()}
    if kind == "LSTM":  # kernel[:, order] = [W_ih; W_hh]^T; the block swap is its own inverse
        h = num_units
        order = np.r_[0:h, 2 * h:3 * h, h:2 * h, 3 * h:4 * h]
        kernel = np.concatenate([g["weight_ih_l0"].T, g["weight_hh_l0"].T], axis=0)
        return {"kernel": kernel[:, order], "bias": g["bias_ih_l0"][order]}
    return {"input/kernel": g["weight_ih_l0"].T, "recurrent/kernel": g["weight_hh_l0"].T,
            "input/bias": g["bias_ih_l0"], "recurrent/bias": g["bias_hh_l0"]}


if __name__ == "__main__":
    job = np.load(sys.argv[1])
    train = "train" in job.files and bool(job["train"])
    print(json.dumps(train_torch(sys.argv[1]) if train else time_torch(sys.argv[1])))
