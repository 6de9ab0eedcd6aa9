"""``cellgen bench SPEC --train --torch-layer``: the cost of the torch layer over the raw training step.

For each spec and shape, in ONE process, on the same float32 weights and inputs:

* ``raw vjp``      ``dynamic_rnn_vjp(params, x)`` + ``backward(np.ones_like(outputs))`` (what
                   ``cellgen bench --train`` times as "cellgen");
* ``torch layer``  ``cellgen.torch.RNN`` with the same weights: ``outputs, _ = layer(x)`` and
                   ``outputs.sum().backward()``, ``x`` and every parameter requiring grad, the grads set
                   to None before each step (``optimizer.zero_grad()``'s default), so it computes what
                   the raw step computes plus torch's autograd bookkeeping;
* ``torch``        ``torch.nn.LSTM``/``GRU`` (or the eager loop) forward + backward, in a process of its
                   own as in ``--train`` (:mod:`cellgen.tools.bench_torch`).

The raw step and the layer step alternate in blocks (raw, layer, raw, layer), each block after a
pause (:func:`cellgen.tools.bench_common.timed_blocks`); each figure is the best of its two blocks (and
of ``--rounds``). The layer's gradients are checked against the raw step's (max abs difference).
"""

from __future__ import annotations

import time

import numpy as np

from cellgen.tools.bench_common import (
    BENCH_HYPER,
    BENCH_SIZES,
    Progress,
    Result,
    ms_cell,
    torch_train_job,
    add_torch_times,
    ratio_cell,
    load_module,
    timed_blocks,
)

#: The table's columns.
LAYER_IMPLS = ("raw vjp", "torch layer", "torch")


def bench_layer_one(spec_path: str, label: str, shape: tuple[int, int, int, int], args,
                    progress: Progress) -> Result:
    """The raw training step and the layer's, side by side in this process; torch in its own."""
    import torch

    from cellgen.torch import RNN

    torch.set_num_threads(args.threads)
    module = load_module(spec_path)
    batch, max_time, input_size, num_units = shape
    sizes = BENCH_SIZES.get(module.NAME, lambda h: {s: h for s in module.SIZES})(num_units)
    hyper = BENCH_HYPER.get(module.NAME, {})
    rng = np.random.default_rng(0)
    params = module.init_params(input_size, num_units, seed=0, **sizes)
    inputs = rng.standard_normal((batch, max_time, input_size)).astype(np.float32)
    recompute = bool(args.recompute)
    layer = RNN(module, input_size, num_units, backend=args.backend, recompute=recompute, seed=0, **sizes, **hyper)
    layer.load_state_dict(params)
    x = torch.from_numpy(inputs).requires_grad_(True)
    result = Result(module.NAME, label, shape, notes={"sizes": sizes, "hyper": hyper, "recompute": recompute,
                                                       "torch_threads": torch.get_num_threads()})

    def raw():
        (outputs, _), backward = module.dynamic_rnn_vjp(params, inputs, backend=args.backend, recompute=recompute,
                                                        **hyper)
        return outputs, backward(np.ones_like(outputs))

    def layer_step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        outputs, _ = layer(x)
        outputs.sum().backward()
        return outputs

    start = time.perf_counter()
    expected, grads = raw()
    result.notes["first_call_s"] = time.perf_counter() - start
    outputs = layer_step()
    diffs = [float(np.max(np.abs(outputs.detach().numpy() - expected), initial=0.0)),
             float(np.max(np.abs(x.grad.numpy() - grads.inputs), initial=0.0))]
    diffs += [float(np.max(np.abs(p.grad.numpy() - grads.params[k]), initial=0.0))
              for k, p in layer.tf_parameters().items()]
    result.notes["layer_max_abs_diff"] = max(diffs)
    blocks = timed_blocks({"raw vjp": raw, "torch layer": layer_step, "raw vjp 2": raw, "torch layer 2": layer_step},
                          args.repeat, args.warmup)
    for name in ("raw vjp", "torch layer"):
        a, b = blocks[name], blocks[name + " 2"]
        result.times[name] = {"best": min(a["best"], b["best"]), "median": float(np.median([a["median"],
                                                                                           b["median"]]))}
    result.notes["paired_ratio"] = paired_ratio(raw, layer_step, args.repeat)
    progress.step(f"{module.NAME} {label} raw vjp / torch layer")
    add_torch_times(result, torch_train_job(module, params, inputs, hyper, expected, grads, num_units, args))
    progress.step(f"{module.NAME} {label} torch (train)")
    return result


def paired_ratio(raw, layer_step, pairs: int) -> float:
    """The median over ``pairs`` back-to-back pairs (in alternating order) of layer time / raw time: a
    neighbour's load that changes over seconds hits both calls of a pair alike."""
    ratios = []
    for k in range(max(pairs, 3)):
        times = {}
        for name, fn in ((("raw", raw), ("layer", layer_step)) if k % 2 == 0 else
                         (("layer", layer_step), ("raw", raw))):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["layer"] / times["raw"])
    return float(np.median(ratios))


def layer_table(results: list[Result]) -> str:
    """Best (median) ms of the raw step, the layer's and torch's, and the ratios."""
    head = (f"{'spec':<11} {'shape':<5} " + " ".join(f"{n + ' ms':>18}" for n in LAYER_IMPLS)
            + "  layer/raw  paired layer/torch  torch is                 layer-raw max|d|")
    lines = ["training step through the torch layer (forward + backward of sum(outputs)):", head, "-" * len(head)]
    for r in results:
        torch = r.notes.get("torch") if isinstance(r.notes.get("torch"), dict) else {}
        lines.append(f"{r.spec:<11} {r.shape:<5} " + " ".join(ms_cell(r, n) for n in LAYER_IMPLS) + "  "
                     + f"{ratio_cell(r.ratio('torch layer', 'raw vjp')):>9} "
                     + f"{r.notes.get('paired_ratio', float('nan')):6.2f}x "
                     + f"{ratio_cell(r.ratio('torch layer', 'torch')):>11}  "
                     + f"{torch.get('impl', '-'):<24} {r.notes.get('layer_max_abs_diff', float('nan')):8.1e}")
    lines.append("times: best (median) of the repeats, raw and layer each the best of two alternating blocks; ratios "
                 "from best times; paired: the median of layer/raw over back-to-back pairs; max|d|: the layer's "
                 "outputs and gradients against the raw step's.")
    return "\n".join(lines)
