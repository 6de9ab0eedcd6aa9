"""``cellgen.torch``: the generated cells as torch modules (docs/torch.md).

* parameters and ``state_dict``: TF names, ``init_params`` dicts load unchanged, defaults are the
  module's initialisers, nested and stacked (``cell_0/kernel``) keys;
* ``from_torch`` / ``to_torch``: outputs, final states and the gradients of the inputs, the initial
  state and every weight equal ``torch.nn.LSTM`` / ``torch.nn.GRU``'s (float64 1e-10, float32 1e-5);
* the eager TF LSTMCell (peepholes, clips, projection), GRUCell and QRNN of ``tests/torch_cells.py``:
  the same, through torch autograd;
* ``torch.autograd.gradcheck`` (float64) of every shipped spec with ragged lengths (0 and T), a random
  initial state, inputs, parameters and initial state all requiring grad; bidirectional; MultiRNN;
* the custom ops: ``torch.compile(fullgraph=True)`` with no graph break and the eager numbers, a second
  backward of one graph, the saved values freed without a backward, in-place changes refused;
* zero copies across (NumPy views of the tensors' memory), dtypes and argument errors;
* the cuda backend through the layer in numba's CUDA simulator (a subprocess).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch_cells as tc

import cellgen
import cellgen.torch as ct
from cellgen import torch_ops

REPO = Path(__file__).resolve().parent.parent
SPECS = ("basic_rnn", "basic_lstm", "lstm", "gru", "gru_cudnn", "qrnn", "qrnn_f", "qrnn_ifo")
IN, H, P = 3, 4, 2
SIZES = {"lstm": {"num_proj": P}}
#: lstm with both clips active on part of the values (as tests/gradcheck.py)
HYPER: dict[str, dict[str, float]] = {"lstm": {"cell_clip": 0.8, "proj_clip": 0.3}, "basic_lstm": {"forget_bias": 0.3}}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(params=["eager", "ops"])
def path(request) -> Any:
    """Eager calls through the autograd.Function (the default) or through the custom ops, as compiled graphs."""
    old = torch_ops.ops_always(request.param == "ops")
    yield request.param
    torch_ops.ops_always(old)


def module(name: str) -> ModuleType:
    return importlib.import_module(f"generated.{name}")


def layer_for(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, input_size: int = IN, **kw: Any) -> ct.RNN:
    """A layer of ``name`` with generic random parameters (biases off their constant initial values)."""
    layer = ct.RNN(module(name), input_size, H, dtype=dtype, seed=seed, **SIZES.get(name, {}), **HYPER.get(name, {}),
                   **kw)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * (2 * torch.rand(p.shape, generator=gen, dtype=dtype) - 1))
    return layer


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Same shape, and max |actual - expected| <= tol * max |expected|."""
    got, want = tuple(actual.shape), tuple(expected.shape)
    assert got == want, f"{what}: shape {got} != {want}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max()) if e.numel() else 1.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol * max(scale, 1e-3), f"{what}: max |diff| {err:.3g} > {tol:g} * {scale:.3g}"


def random_case(layer: ct.RNN, batch: int = 3, steps: int = 4, seed: int = 1):
    """Inputs, ragged lengths (T, 2, 0, ...) and a random initial state for ``layer``, as leaves."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, steps, layer.input_size) if layer.batch_first else (steps, batch, layer.input_size)
    x = torch.randn(shape, generator=gen, dtype=layer.dtype, requires_grad=True)
    lengths = torch.tensor([steps, 2, 0, 1, steps][:batch])
    state = layer.State(*(torch.randn(batch, n, generator=gen, dtype=layer.dtype, requires_grad=True)
                          for n in layer.state_size))
    return x, lengths, state


# -- parameters and state_dict ------------------------------------------------------------------
def test_importing_cellgen_imports_no_torch() -> None:
    code = "import sys, cellgen, cellgen.runtime, cellgen.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("name", SPECS)
def test_state_dict_keys_are_the_tf_names_and_init_params_loads_unchanged(name: str) -> None:
    mod = module(name)
    layer = ct.RNN(mod, IN, H, dtype=torch.float64, seed=5, **SIZES.get(name, {}))
    fresh = mod.init_params(IN, H, dtype=np.float64, seed=5, **SIZES.get(name, {}))
    assert list(layer.state_dict()) == list(mod.param_shapes(IN, H, **SIZES.get(name, {}))) == list(fresh)
    for key, value in layer.state_dict().items():  # the default initialisation is init_params'
        np.testing.assert_array_equal(value.numpy(), fresh[key])
    other = mod.init_params(IN, H, dtype=np.float64, seed=6, **SIZES.get(name, {}))
    layer.load_state_dict(other)  # NumPy arrays under TF names, as they are
    for key, value in layer.tf_parameters().items():
        assert isinstance(value, torch.nn.Parameter)
        np.testing.assert_array_equal(value.detach().numpy(), other[key])
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in fresh.items()})
    np.testing.assert_array_equal(next(iter(layer.tf_parameters().values())).detach().numpy(),
                                  next(iter(fresh.values())))


def test_state_dict_nested_missing_and_unexpected_keys() -> None:
    model = torch.nn.Module()
    model.rnn = ct.RNN(module("gru"), IN, H, dtype=torch.float64, seed=0)
    model.head = torch.nn.Linear(H, 2, dtype=torch.float64)
    keys = list(model.state_dict())
    assert keys == ["rnn.gates/kernel", "rnn.gates/bias", "rnn.candidate/kernel", "rnn.candidate/bias",
                    "head.weight", "head.bias"]
    assert [n for n, _ in model.rnn.named_parameters()] == ["gates_kernel", "gates_bias", "candidate_kernel",
                                                             "candidate_bias"]
    state = model.state_dict()
    state.pop("rnn.candidate/bias")
    state["rnn.extra"] = torch.zeros(1)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["rnn.candidate/bias"]
    assert result.unexpected_keys == ["rnn.extra"]
    with pytest.raises(RuntimeError, match="candidate/bias"):
        model.load_state_dict(state)


def test_attribute_names_for_any_tf_name() -> None:
    taken: set[str] = {"forward"}
    names = ["rnn/cell.kernel:0", "rnn_cell_kernel_0", "forward", "2d", "gates/kernel"]
    got = [ct._attribute(n, taken) for n in names]
    assert got == ["rnn_cell_kernel_0", "rnn_cell_kernel_0_2", "forward_2", "_2d", "gates_kernel"]
    assert all(g.isidentifier() for g in got)


def test_seed_from_torch_manual_seed_and_reset() -> None:
    torch.manual_seed(7)
    a = ct.RNN(module("basic_lstm"), IN, H)
    torch.manual_seed(7)
    b = ct.RNN(module("basic_lstm"), IN, H)
    c = ct.RNN(module("basic_lstm"), IN, H)
    assert torch.equal(a.kernel, b.kernel) and not torch.equal(a.kernel, c.kernel)
    assert a.kernel.dtype == torch.float32
    c.reset_parameters(seed=3)
    np.testing.assert_array_equal(c.kernel.detach().numpy(), module("basic_lstm").init_params(IN, H, seed=3)["kernel"])


def test_a_cell_by_name_or_path_loads_through_cellgen_load(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(cellgen, "load", lambda cell: seen.append(cell) or module("qrnn_f"))
    layer = ct.RNN("specs/qrnn_f.py", IN, H)
    assert seen == ["specs/qrnn_f.py"] and layer.cell is module("qrnn_f")


# -- forward semantics ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_forward_is_dynamic_rnn(name: str, batch_first: bool, path: str) -> None:
    layer = layer_for(name, batch_first=batch_first)
    x, lengths, state = random_case(layer)
    params = {k: v.detach().numpy() for k, v in layer.tf_parameters().items()}
    want_out, want_state = module(name).dynamic_rnn(params, x.detach().numpy(), sequence_length=lengths.numpy(),
                                                    initial_state=tuple(s.detach().numpy() for s in state),
                                                    time_major=not batch_first, **HYPER.get(name, {}))
    for grad in (True, False):  # the training op and the inference op
        with torch.set_grad_enabled(grad):
            out, final = layer(x, lengths, state)
        assert out.requires_grad == grad and type(final) is module(name).State
        np.testing.assert_array_equal(out.detach().numpy(), want_out)
        for s, w in zip(final, want_state, strict=True):
            np.testing.assert_array_equal(s.detach().numpy(), w)


def test_bidirectional_is_bidirectional_dynamic_rnn_with_fw_bw_names(path: str) -> None:
    layer = layer_for("qrnn", bidirectional=True)
    assert list(layer.state_dict()) == ["fw/kernel", "fw/bias", "bw/kernel", "bw/bias"]
    x, lengths, state = random_case(layer)
    (out_fw, out_bw), (s_fw, s_bw) = layer(x, lengths, (state, None))
    mod = module("qrnn")
    (w_fw, w_bw), (ws_fw, ws_bw) = mod.bidirectional_dynamic_rnn(
        {k: v.detach().numpy() for k, v in layer.tf_parameters("fw").items()},
        {k: v.detach().numpy() for k, v in layer.tf_parameters("bw").items()}, x.detach().numpy(),
        sequence_length=lengths.numpy(), initial_state_fw=tuple(s.detach().numpy() for s in state))
    np.testing.assert_array_equal(out_fw.detach().numpy(), w_fw)
    np.testing.assert_array_equal(out_bw.detach().numpy(), w_bw)
    for got, want in ((s_fw, ws_fw), (s_bw, ws_bw)):
        for s, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(s.detach().numpy(), w)


def test_multi_rnn_is_cellgen_multi_rnn_with_cell_k_names(path: str) -> None:
    layers = [layer_for("basic_lstm"), ct.RNN(module("qrnn"), H, 5, dtype=torch.float64, seed=1),
              ct.RNN(module("lstm"), 5, H, dtype=torch.float64, seed=2, num_proj=P, cell_clip=0.8)]
    stack = ct.MultiRNN(layers)
    keys = list(stack.state_dict())
    assert keys[:2] == ["cell_0/kernel", "cell_0/bias"] and "cell_2/projection/kernel" in keys
    x, lengths, _ = random_case(layers[0])
    out, states = stack(x, lengths)
    np_layers = [(layer.cell, {k: v.detach().numpy() for k, v in layer.tf_parameters().items()}, layer.hyper)
                 for layer in layers]
    want_out, want_states = cellgen.multi_rnn(np_layers, x.detach().numpy(), sequence_length=lengths.numpy())
    np.testing.assert_array_equal(out.detach().numpy(), want_out)
    assert len(states) == 3 and all(type(s) is layer.State for s, layer in zip(states, layers, strict=True))
    for got, want in zip(states, want_states, strict=True):
        for s, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(s.detach().numpy(), w)
    copy = ct.MultiRNN([layer_for("basic_lstm", seed=9), ct.RNN(module("qrnn"), H, 5, dtype=torch.float64),
                        ct.RNN(module("lstm"), 5, H, dtype=torch.float64, num_proj=P, cell_clip=0.8)])
    copy.load_state_dict(stack.state_dict())
    assert torch.equal(copy(x, lengths)[0], out)
    with pytest.raises(ValueError, match=r"layers\[1\] has input_size=5, but layers\[0\] outputs 4"):
        ct.MultiRNN([layer_for("gru"), ct.RNN(module("gru"), 5, H)])


# -- PyTorch's nn.LSTM / nn.GRU ------------------------------------------------------------------
def _torch_grads(rnn: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {f"{k}_l0{s}": getattr(rnn, f"{k}_l0{s}").grad for s in suffixes
            for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if getattr(rnn, f"{k}_l0{s}", None) is not None}


def _as_torch_grads(layer: ct.RNN, kind: str, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Our TF parameters' gradients in nn.LSTM/GRU's layout (the bias gradient is both torch biases')."""
    out = {}
    for direction, s in zip(layer.directions, suffixes, strict=True):
        g = {k: v.grad for k, v in (layer.tf_parameters(direction) if direction else layer.tf_parameters()).items()
             if v.grad is not None}
        if kind == "lstm":
            kernel = ct._blocks(g["kernel"], 4, ct._LSTM_PERM, 1)
            out |= {f"weight_ih_l0{s}": kernel[:layer.input_size].T, f"weight_hh_l0{s}": kernel[layer.input_size:].T}
            if "bias" in g:
                out |= {f"bias_ih_l0{s}": ct._blocks(g["bias"], 4, ct._LSTM_PERM, 0),
                        f"bias_hh_l0{s}": ct._blocks(g["bias"], 4, ct._LSTM_PERM, 0)}
        else:
            out |= {f"weight_ih_l0{s}": g["input/kernel"].T, f"weight_hh_l0{s}": g["recurrent/kernel"].T}
            if "input/bias" in g:
                out |= {f"bias_ih_l0{s}": g["input/bias"], f"bias_hh_l0{s}": g["recurrent/bias"]}
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_from_torch_outputs_and_gradients_equal_torch(kind: str, bias: bool, batch_first: bool,
                                                      dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    rnn = cls(IN, H, bias=bias, batch_first=batch_first, dtype=dtype)
    layer = ct.RNN.from_torch(rnn)
    cell_name = layer.cell.NAME
    assert cell_name == {"lstm": "basic_lstm", "gru": "gru_cudnn"}[kind]
    assert layer.batch_first == batch_first
    assert len(list(layer.parameters())) == {("lstm", True): 2, ("lstm", False): 1, ("gru", True): 4,
                                             ("gru", False): 2}[kind, bias]  # no bias: constant zero buffers
    steps, batch = 5, 3
    x = torch.randn((batch, steps, IN) if batch_first else (steps, batch, IN), dtype=dtype)
    h0, c0 = torch.randn(1, batch, H, dtype=dtype), torch.randn(1, batch, H, dtype=dtype)
    r_out = torch.randn((batch, steps, H) if batch_first else (steps, batch, H), dtype=dtype)
    r_h, r_c = torch.randn(batch, H, dtype=dtype), torch.randn(batch, H, dtype=dtype)
    results = []
    for model in (rnn, layer):
        xi = x.clone().requires_grad_(True)
        hi, ci = h0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        if model is rnn:
            out, hn = rnn(xi, (hi, ci) if kind == "lstm" else hi)
            h, c = (hn[0][0], hn[1][0]) if kind == "lstm" else (hn[0], None)
        else:
            state = layer.State(ci[0], hi[0]) if kind == "lstm" else layer.State(hi[0])
            out, final = layer(xi, initial_state=state)
            h, c = final.h, getattr(final, "c", None)
        loss = (out * r_out).sum() + (h * r_h).sum() + (0 if c is None else (c * r_c).sum())
        loss.backward()
        results.append((out, h, c, xi.grad, hi.grad, ci.grad))
    tol = TOL[dtype]
    for what, ours, theirs in zip(("outputs", "h", "c", "d_inputs", "d_h0", "d_c0"), results[1], results[0],
                                  strict=True):
        if theirs is not None:
            assert_close(ours, theirs, tol, what)
    want = _torch_grads(rnn, ("",))
    got = _as_torch_grads(layer, kind, ("",))
    assert set(got) == set(want)
    for key in want:
        assert_close(got[key], want[key], tol, f"d {key}")
    back = layer.to_torch()
    assert type(back) is cls and back.bias == bias and back.batch_first == batch_first
    with torch.no_grad():
        assert_close(back(x)[0], rnn(x)[0], tol, "to_torch outputs")
        assert_close(ct.RNN.from_torch(back)(x)[0], layer(x)[0], 0.0, "from_torch(to_torch(layer))")


def test_to_torch_of_a_layer_with_forget_bias_and_bidirectional_from_torch() -> None:
    torch.manual_seed(4)
    layer = ct.RNN(module("basic_lstm"), IN, H, dtype=torch.float64, forget_bias=0.7, seed=1)
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer.to_torch()(x)[0], layer(x)[0], 1e-12, "to_torch with forget_bias 0.7")
    rnn = torch.nn.GRU(IN, H, bidirectional=True, batch_first=True, dtype=torch.float64)
    bi = ct.RNN.from_torch(rnn)
    assert bi.bidirectional and list(bi.state_dict())[0] == "fw/input/kernel"
    with torch.no_grad():
        (out_fw, out_bw), _ = bi(x)  # full lengths: torch's reverse direction is TF's reverse_sequence
        assert_close(torch.cat([out_fw, out_bw], -1), rnn(x)[0], 1e-12, "bidirectional outputs")
    with pytest.raises(ValueError, match="num_layers=1"):
        ct.RNN.from_torch(torch.nn.LSTM(IN, H, num_layers=2))
    with pytest.raises(ValueError, match="this layer's cell is qrnn"):
        layer_for("qrnn").to_torch()


# -- the eager torch cells of tests/torch_cells.py -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["lstm", "gru", "qrnn"])
def test_gradients_equal_torch_autograd_of_the_eager_cells(name: str, dtype: torch.dtype) -> None:
    layer = layer_for(name, dtype=dtype)
    x, lengths, state = random_case(layer, batch=4, steps=5)
    gen = torch.Generator().manual_seed(11)
    out, final = layer(x, lengths, state)
    r_out = torch.randn(out.shape, generator=gen, dtype=dtype)
    r_state = [torch.randn(s.shape, generator=gen, dtype=dtype) for s in final]
    (out * r_out + 0).sum().add(sum((s * r).sum() for s, r in zip(final, r_state, strict=True))).backward()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.tf_parameters().items()}
    x2 = x.detach().clone().requires_grad_(True)
    state2 = [s.detach().clone().requires_grad_(True) for s in state]
    ref_out, ref_final = tc.REFERENCES[name](params, x2, lengths.numpy(), state2, **HYPER.get(name, {}))
    (ref_out * r_out).sum().add(sum((s * r).sum() for s, r in zip(ref_final, r_state, strict=True))).backward()
    tol = TOL[dtype]
    assert_close(out, ref_out, tol, "outputs")
    assert_close(x.grad, x2.grad, tol, "d_inputs")
    for s, r in zip(state, state2, strict=True):
        assert_close(s.grad, r.grad, tol, "d_initial_state")
    for key, p in layer.tf_parameters().items():
        assert_close(p.grad, params[key].grad, tol, f"d {key}")


# -- gradcheck -------------------------------------------------------------------------------------
def _gradcheck(model: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor, initial: Any, flat_state: list,
               rebuild) -> None:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in model.named_parameters()]

    def flat(value: Any) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value]
        return [t for v in value for t in flat(v)]

    def fn(x: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ps, st = rest[:len(names)], rest[len(names):]
        result = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x, lengths, rebuild(st)))
        return tuple(flat(result))

    assert torch.autograd.gradcheck(fn, (x, *params, *flat_state), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", SPECS)
def test_gradcheck_every_shipped_spec(name: str) -> None:
    layer = layer_for(name)
    x, lengths, state = random_case(layer)
    assert lengths.tolist() == [4, 2, 0]
    _gradcheck(layer, x, lengths, state, list(state), lambda st: layer.State(*st))


def test_gradcheck_bidirectional_and_multi_rnn(path: str) -> None:
    bi = layer_for("qrnn", bidirectional=True, batch_first=False)
    x, lengths, state = random_case(bi)
    _, _, other = random_case(bi, seed=2)
    n = len(state)
    _gradcheck(bi, x, lengths, None, [*state, *other],
               lambda st: (bi.State(*st[:n]), bi.State(*st[n:])))
    stack = ct.MultiRNN([layer_for("gru_cudnn"), layer_for("lstm", seed=1, input_size=H)])
    x, lengths, s0 = random_case(stack.layers[0])
    _, _, s1 = random_case(stack.layers[1], seed=3)
    _gradcheck(stack, x, lengths, None, [*s0, *s1],
               lambda st: (stack.layers[0].State(*st[:1]), stack.layers[1].State(*st[1:])))


# -- the ops: torch.compile, backward twice, lifetime, in-place -----------------------------------
class CharModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, IN, dtype=torch.float64)
        self.rnn = layer_for("gru_cudnn")
        self.head = torch.nn.Linear(H, 7, dtype=torch.float64)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(self.embed(tokens), sequence_length=lengths)
        loss = torch.nn.functional.cross_entropy(self.head(out).flatten(0, 1), tokens.flatten())
        return loss + state.h.square().sum()


def test_torch_compile_fullgraph_has_no_graph_break_and_gives_the_eager_numbers() -> None:
    torch.manual_seed(0)
    model = CharModel()
    tokens, lengths = torch.randint(0, 7, (3, 6)), torch.tensor([6, 2, 0])
    explain = torch._dynamo.explain(model)(tokens, lengths)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "cellgen.rnn_vjp.default" in ops
    eager = model(tokens, lengths)
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call runs the compiled graphs again, with a fresh handle
        got = compiled(tokens, lengths)
        got.backward()
        assert_close(got, eager, 1e-12, "compiled loss")
        for n, p in model.named_parameters():
            assert_close(p.grad, want[n], 1e-12, f"compiled d {n}")
        model.zero_grad()
    with torch.no_grad():
        assert_close(compiled(tokens, lengths), eager, 1e-12, "compiled inference (cellgen::rnn)")
    assert torch_ops.saved_count() == 0


def test_a_second_backward_of_one_graph_recomputes_the_saved_values(path: str) -> None:
    layer = layer_for("lstm")
    x, lengths, state = random_case(layer)
    out, final = layer(x, lengths, state)
    loss = out.square().sum() + final.c.sum()
    first = torch.autograd.grad(loss, [x, layer.kernel], retain_graph=True)
    second = torch.autograd.grad(loss, [x, layer.kernel])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_double_backward_is_refused_by_name(path: str) -> None:
    layer = layer_for("basic_rnn")
    x, _, _ = random_case(layer)
    out, _ = layer(x)
    (d_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    message = "cellgen.rnn_backward.default but no autograd formula" if path == "ops" else "once_differentiable"
    with pytest.raises(RuntimeError, match=message):
        d_x.sum().backward()


def test_saved_values_are_freed_without_a_backward() -> None:
    """The ops' registry (the eager path keeps the backward on the autograd node: freed with it)."""
    torch_ops.ops_always(True)
    try:
        _freed_without_a_backward()
    finally:
        torch_ops.ops_always(False)


def _freed_without_a_backward() -> None:
    before = torch_ops.saved_count()
    layer = layer_for("basic_lstm")
    x, _, _ = random_case(layer)
    result = layer(x)
    assert torch_ops.saved_count() == before + 1
    del result  # the outputs and the final state: the last references to the graph that saved the handle
    assert torch_ops.saved_count() == before
    out, _ = layer(x)
    out.sum().backward()
    assert torch_ops.saved_count() == before


def test_changing_a_saved_tensor_in_place_is_refused(path: str) -> None:
    layer = layer_for("basic_rnn")
    x, _, _ = random_case(layer)
    out, _ = layer(x)
    with torch.no_grad():
        layer.kernel.mul_(2)  # the backward would read the old weights through their memory
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# -- zero copy, dtypes, errors -----------------------------------------------------------------------
def test_cpu_tensors_cross_without_a_copy(monkeypatch, path: str) -> None:
    layer = layer_for("basic_lstm")
    mod = module("basic_lstm")
    seen: dict[str, Any] = {}
    real = mod.dynamic_rnn_vjp

    def spy(params, inputs, **kw):
        (out, state), backward = real(params, inputs, **kw)
        seen.update(params=params, inputs=inputs, out=out, state=state)

        def back(d_out, d_state=None):
            seen["d_out"] = d_out
            seen["grads"] = grads = backward(d_out, d_state)
            return grads

        return (out, state), back

    monkeypatch.setattr(mod, "dynamic_rnn_vjp", spy)
    x, lengths, state = random_case(layer)
    out, final = layer(x, lengths, state)
    assert np.shares_memory(seen["inputs"], x.detach().numpy())
    for key, p in layer.tf_parameters().items():
        assert np.shares_memory(seen["params"][key], p.detach().numpy())
    assert out.data_ptr() == seen["out"].ctypes.data
    assert final.c.data_ptr() == seen["state"].c.ctypes.data
    d_out = torch.randn(out.shape, dtype=out.dtype)
    out.backward(d_out)
    assert np.shares_memory(seen["d_out"], d_out.numpy())
    assert x.grad.data_ptr() == seen["grads"].inputs.ctypes.data


def test_dtypes_and_argument_errors() -> None:
    mod = module("basic_lstm")
    with pytest.raises(ValueError, match=r"dtype must be torch.float32 or torch.float64, got torch.float16"):
        ct.RNN(mod, IN, H, dtype=torch.float16)
    layer = ct.RNN(mod, IN, H)
    x = torch.randn(2, 3, IN)
    for bad, message in [
        (x.double(), r"inputs must have the layer's dtype torch.float32 .*got torch.float64"),
        (x.half(), r"inputs must have the layer's dtype torch.float32 .*got torch.float16"),
        (x[..., :2], r"inputs must have shape \[batch_size, max_time, input_size\] with input_size=3, got \(2, 3, 2\)"),
        (x[0], r"got \(3, 3\)"),
        (x.numpy(), r"inputs must be a torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            layer(bad)
    with pytest.raises(ValueError, match=r"initial_state.h must be a tensor of shape \[batch_size, h_size\] = \(2, 4"):
        layer(x, initial_state=layer.State(torch.zeros(2, H), torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"initial_state.c must have the inputs' dtype torch.float32"):
        layer(x, initial_state=layer.State(torch.zeros(2, H, dtype=torch.float64), torch.zeros(2, H)))
    with pytest.raises(ValueError, match=r"sequence_length must have shape \[batch_size\] = \(2,\), got \(3,\)"):
        layer(x, sequence_length=[1, 2, 3])
    with pytest.raises(ValueError, match=r"sequence_length must hold integers, got dtype torch.float32"):
        layer(x, sequence_length=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match=r"sequence_length values must lie in \[0, max_time=3\]"):
        layer(x, sequence_length=[1, 4])  # cellgen's own check, inside the op
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) forget_bais for cell basic_lstm"):
        ct.RNN(mod, IN, H, forget_bais=1.0)
    with pytest.raises(ValueError, match=r"backend must be one of cpu, cuda, reference, got 'tpu'"):
        ct.RNN(mod, IN, H, backend="tpu")
    with pytest.raises(ValueError, match=r"size 'num_proj' is required"):
        ct.RNN(module("lstm"), IN, H)
    with pytest.raises(ValueError, match=r"from_torch takes an nn.LSTM or nn.GRU, got RNN"):
        ct.RNN.from_torch(torch.nn.RNN(IN, H))


def test_float32_layer_equals_the_float32_module() -> None:
    layer = layer_for("gru", dtype=torch.float32)
    x, lengths, state = random_case(layer)
    out, final = layer(x, lengths, state)
    assert out.dtype == torch.float32 and final.h.dtype == torch.float32
    out.sum().backward()
    assert layer.gates_kernel.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# -- the cuda backend, in numba's simulator ----------------------------------------------------------
CUDASIM = textwrap.dedent("""
    import numpy as np, torch, numba.cuda
    import generated.basic_lstm as bl
    import cellgen.torch as ct
    from cellgen import torch_ops
    assert numba.cuda.is_available()  # the simulator
    for mod in (bl,):  # each simulated launch runs a Python thread per CUDA thread: one cell
        torch.manual_seed(0)
        grads = []
        for backend in ("cpu", "cuda"):
            torch.manual_seed(0)
            layer = ct.RNN(mod, 3, 4, dtype=torch.float64, backend=backend, seed=1)
            x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
            state = layer.State(*(torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in layer.state_size))
            out, final = layer(x, torch.tensor([3, 1]), state)
            (out.square().sum() + final.c.sum()).backward()
            grads.append([out, final.c, x.grad, state.c.grad] + [p.grad for p in layer.parameters()])
        for a, b in zip(*grads):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-12, (mod.NAME, float((a - b).abs().max()))
    device = numba.cuda.to_device(np.arange(6.0).reshape(2, 3))
    t = torch_ops.as_tensor(device, torch.device("cpu"))
    assert torch.equal(t, torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    print("ok")
""")


def test_cuda_backend_through_the_layer_in_the_simulator() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CUDASIM], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -- the bench ------------------------------------------------------------------------------------------
def test_bench_torch_layer_times_the_raw_step_and_the_layer(monkeypatch, capsys) -> None:
    from argparse import Namespace

    from cellgen import cli
    from cellgen.tools import bench, bench_torch_layer

    monkeypatch.setattr(bench_torch_layer, "load_module", lambda spec: module("basic_rnn"))
    args = Namespace(threads=1, recompute=False, backend="cpu", repeat=2, warmup=1, no_torch=True)
    result = bench_torch_layer.bench_layer_one("specs/basic_rnn.py", "tiny", (2, 3, 4, 5), args,
                                               bench.Progress(2))
    assert set(result.times) == {"raw vjp", "torch layer"} and result.notes["layer_max_abs_diff"] == 0.0
    assert result.notes["paired_ratio"] > 0
    table = bench_torch_layer.layer_table([result])
    assert "basic_rnn" in table and "layer/raw" in table and "paired" in table
    assert cli.main(["bench", "specs/basic_rnn.py", "--torch-layer"]) == 2
    assert "--torch-layer needs --train" in capsys.readouterr().err
