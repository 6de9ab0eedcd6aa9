"""The ``torch.library`` custom ops behind :mod:`cellgen.torch` (docs/torch.md, "Autograd").

:func:`call` is the layer's forward: under ``torch.compile`` (``torch.compiler.is_compiling()``) it calls
the ops below; in eager mode the same work (:func:`_run`, :func:`_backward_impl`) runs through one
``torch.autograd.Function`` (:class:`_EagerRNN`), whose dispatch costs less than the ops'.

Three ops, each with a fake (meta) implementation, so that ``torch.compile`` traces through them:

* ``cellgen::rnn(config, inputs, sequence_length, initial_state, params) -> (outputs, finals)``:
  ``dynamic_rnn`` (or ``bidirectional_dynamic_rnn``), for inference;
* ``cellgen::rnn_vjp(...) -> (outputs, finals, handle)``: ``dynamic_rnn_vjp``, the forward that
  saves. Its ``backward`` closure (which holds the saved activations) goes into a registry under
  a fresh key; ``handle`` is a 0-d int64 CPU tensor holding the key, and the registry entry lives as
  long as the handle's memory does (a finalizer drops it when the autograd graph that saved the
  handle is freed without a backward);
* ``cellgen::rnn_backward(config, handle, d_outputs, d_finals, inputs, sequence_length,
  initial_state, params) -> (d_inputs, d_initial_state, d_params)``: the generated fused backward.
  It takes the handle's closure out of the registry; when there is none (a second backward of
  the same graph with ``retain_graph=True``, as ``torch.autograd.gradcheck`` does), it runs the
  forward that saves again on the saved tensors, which torch's version counters have checked are
  unchanged since the forward.

``rnn_vjp``'s autograd formula (``register_autograd``) saves the handle and the op's input tensors and
calls ``rnn_backward``. ``config`` is a JSON string (:class:`Config`): the generated module's name in
``sys.modules``, hyperparameters, backend, layout, sizes; it is a constant of a compiled graph.

Arrays cross without copies: a CPU tensor is given to the generated module as ``Tensor.numpy()`` (a
view of its memory), a CUDA tensor as itself (``__cuda_array_interface__``, read by the cuda backend
without a copy), and results come back as ``torch.from_numpy`` views or ``torch.as_tensor`` of device
arrays (CUDA array interface, no copy).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["Config", "call", "ops_always", "parse_config", "rnn", "rnn_backward", "rnn_vjp", "saved_count"]


@dataclass(frozen=True)
class Config:
    """What the ops need to know about a layer besides its tensors (a constant per layer)."""

    module: str  # the generated module's name in sys.modules
    hyper: dict[str, float] = field(default_factory=dict)
    backend: str = "cpu"
    recompute: bool = False
    batch_first: bool = True
    bidirectional: bool = False
    input_size: int = 0
    num_units: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    output_size: int = 0
    state_size: tuple[int, ...] = ()
    params: tuple[str, ...] = ()  # the TF names, in the order the ops get the tensors (per direction)

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


@functools.cache
def parse_config(text: str) -> Config:
    raw = json.loads(text)
    raw["state_size"], raw["params"] = tuple(raw["state_size"]), tuple(raw["params"])
    return Config(**raw)


def cell_module(cfg: Config) -> ModuleType:
    module = sys.modules.get(cfg.module)
    if module is None:
        try:
            module = importlib.import_module(cfg.module)
        except ImportError as err:
            raise RuntimeError(f"cellgen.torch: the layer's cell module {cfg.module} is not loaded in this process "
                               "(build the layer here, or cellgen.load its cell first)") from err
    return module


# -- arrays across ---------------------------------------------------------------------------------
def as_array(t: Tensor) -> Any:
    """What the generated module reads: a NumPy view of a CPU tensor's memory (no copy), a CUDA tensor
    as itself (it exports ``__cuda_array_interface__``, which the cuda backend reads without a copy)."""
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t


def as_tensor(a: Any, device: torch.device) -> Tensor:
    """A result as a tensor on ``device``: NumPy arrays by ``torch.from_numpy`` (no copy; moved when
    ``device`` is not the CPU: the cuda backend's parameter gradients are host arrays), device arrays
    by their CUDA array interface (no copy); numba's simulator's device arrays (host memory) copied."""
    if isinstance(a, np.ndarray):
        if not a.flags.writeable:
            a = a.copy()  # torch.from_numpy warns on read-only memory
        elif not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        t = torch.from_numpy(a)
        return t if device.type == "cpu" else t.to(device)
    if hasattr(a, "__cuda_array_interface__"):
        return torch.as_tensor(a, device=device).contiguous()
    if getattr(a, "__cuda_ndarray__", False):  # numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)
        return torch.from_numpy(np.ascontiguousarray(a.copy_to_host())).to(device)
    return torch.as_tensor(np.asarray(a), device=device).contiguous()


def _fresh(results: list[Any], inputs: list[Any]) -> list[Any]:
    """Results as arrays of their own: a custom op's outputs may alias neither its inputs nor each other."""
    seen = [a for a in inputs if isinstance(a, np.ndarray)]
    out = []
    for a in results:
        if isinstance(a, np.ndarray):
            if any(np.may_share_memory(a, b) for b in seen):
                a = a.copy()
            seen.append(a)
        out.append(a)
    return out


# -- the saved forwards ------------------------------------------------------------------------------
class _Handle(np.ndarray):
    """A 0-d int64 array holding a registry key; ``torch.from_numpy`` keeps it alive with the tensor's
    memory, and its finalizer drops the registry entry when that memory is freed."""


_SAVED: dict[int, Callable[..., Any]] = {}
_KEYS = itertools.count(1)
_LOCK = threading.Lock()


def _new_handle(backward: Callable[..., Any]) -> Tensor:
    key = next(_KEYS)
    with _LOCK:
        _SAVED[key] = backward
    holder = np.array(key, dtype=np.int64).view(_Handle)
    weakref.finalize(holder, _drop, key)
    return torch.from_numpy(holder)


def _drop(key: int) -> None:
    with _LOCK:
        _SAVED.pop(key, None)


def _take(handle: Tensor) -> Callable[..., Any] | None:
    with _LOCK:
        return _SAVED.pop(int(handle.item()), None)


def saved_count() -> int:
    """How many forwards' saved values are held (waiting for their backward): for tests and leak checks."""
    with _LOCK:
        return len(_SAVED)


# -- the work ----------------------------------------------------------------------------------------
def _run(cfg: Config, inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
         params: list[Tensor], train: bool) -> tuple[list[Tensor], list[Tensor], Callable[..., Any] | None]:
    """The generated module's forward (``train``: the one that saves) on the tensors' memory."""
    module = cell_module(cfg)
    n, k = len(cfg.params), len(cfg.state_size)
    arrays = [as_array(p) for p in params]
    xs = as_array(inputs)
    states = [as_array(s) for s in initial_state]
    lengths = None if sequence_length is None else sequence_length.detach().cpu().numpy()
    common: dict[str, Any] = dict(sequence_length=lengths, time_major=not cfg.batch_first, backend=cfg.backend,
                                  **cfg.hyper)
    if train:
        common["recompute"] = cfg.recompute
    back = None
    if cfg.bidirectional:
        p_fw, p_bw = dict(zip(cfg.params, arrays[:n], strict=True)), dict(zip(cfg.params, arrays[n:], strict=True))
        init = {"initial_state_fw": states[:k] or None, "initial_state_bw": states[k:] or None}
        if train:
            (outs, (s_fw, s_bw)), back = module.bidirectional_dynamic_rnn_vjp(p_fw, p_bw, xs, **init, **common)
        else:
            outs, (s_fw, s_bw) = module.bidirectional_dynamic_rnn(p_fw, p_bw, xs, **init, **common)
        outs, finals = list(outs), [*s_fw, *s_bw]
    else:
        p = dict(zip(cfg.params, arrays, strict=True))
        if train:
            (out, state), back = module.dynamic_rnn_vjp(p, xs, initial_state=states or None, **common)
        else:
            out, state = module.dynamic_rnn(p, xs, initial_state=states or None, **common)
        outs, finals = [out], list(state)
    results = _fresh(outs + finals, [xs, *states])
    device = inputs.device
    tensors = [as_tensor(a, device) for a in results]
    return tensors[:len(outs)], tensors[len(outs):], back


@torch.library.custom_op("cellgen::rnn", mutates_args=())
def rnn(config: str, inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
        params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``dynamic_rnn`` / ``bidirectional_dynamic_rnn``: (outputs, final states), no autograd."""
    outs, finals, _ = _run(parse_config(config), inputs, sequence_length, initial_state, params, False)
    return outs, finals


@torch.library.custom_op("cellgen::rnn_vjp", mutates_args=())
def rnn_vjp(config: str, inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
            params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The forward that saves: (outputs, final states, handle of the saved values)."""
    outs, finals, back = _run(parse_config(config), inputs, sequence_length, initial_state, params, True)
    return outs, finals, _new_handle(back)


@torch.library.custom_op("cellgen::rnn_backward", mutates_args=())
def rnn_backward(config: str, handle: Tensor, d_outputs: list[Tensor | None], d_finals: list[Tensor | None],
                 inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
                 params: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The fused backward of the forward ``handle`` saved: (d_inputs, d_initial_state, d_params)."""
    return _backward_impl(parse_config(config), _take(handle), d_outputs, d_finals, inputs, sequence_length,
                          initial_state, params)


def _backward_impl(cfg: Config, back: Callable[..., Any] | None, d_outputs: list[Tensor | None],
                   d_finals: list[Tensor | None], inputs: Tensor, sequence_length: Tensor | None,
                   initial_state: list[Tensor], params: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``back`` (the saving forward's backward; None: run that forward again on the saved tensors, whose
    values torch's version counters have checked) on the results' adjoints (None: zeros)."""
    if back is None:  # its saved values were used by an earlier backward (retain_graph=True): save them again
        _, _, back = _run(cfg, inputs, sequence_length, initial_state, params, True)
    batch, steps = (inputs.shape[0], inputs.shape[1]) if cfg.batch_first else (inputs.shape[1], inputs.shape[0])
    out_shape = (batch, steps, cfg.output_size) if cfg.batch_first else (steps, batch, cfg.output_size)
    dtype = np.float32 if inputs.dtype == torch.float32 else np.float64
    d_outs = [np.zeros(out_shape, dtype) if d is None else as_array(d) for d in d_outputs]
    k = len(cfg.state_size)
    d_states = [None if d is None else as_array(d) for d in d_finals]
    if cfg.bidirectional:
        g = back((d_outs[0], d_outs[1]), (_state_or_none(d_states[:k]), _state_or_none(d_states[k:])))
        d_init = [*g.initial_state_fw, *g.initial_state_bw]
        d_params = [g.params_fw[name] for name in cfg.params] + [g.params_bw[name] for name in cfg.params]
    else:
        g = back(d_outs[0], _state_or_none(d_states))
        d_init, d_params = list(g.initial_state), [g.params[name] for name in cfg.params]
    results = _fresh([g.inputs, *(d_init if initial_state else []), *d_params],
                     [a for a in d_outs + d_states if a is not None])
    device = inputs.device
    tensors = [as_tensor(a, device) for a in results]
    m = len(initial_state)
    return tensors[0], tensors[1:1 + m], tensors[1 + m:]


def _state_or_none(values: list[Any]) -> list[Any] | None:
    return None if all(v is None for v in values) else list(values)


# -- fake (meta) implementations: shapes only, for torch.compile ------------------------------------
def _fake_results(cfg: Config, inputs: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    batch = inputs.shape[0] if cfg.batch_first else inputs.shape[1]
    outs = [inputs.new_empty((inputs.shape[0], inputs.shape[1], cfg.output_size)) for _ in range(cfg.directions)]
    finals = [inputs.new_empty((batch, n)) for _ in range(cfg.directions) for n in cfg.state_size]
    return outs, finals


@rnn.register_fake
def _rnn_fake(config: str, inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
              params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    return _fake_results(parse_config(config), inputs)


@rnn_vjp.register_fake
def _rnn_vjp_fake(config: str, inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
                  params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    outs, finals = _fake_results(parse_config(config), inputs)
    return outs, finals, inputs.new_empty((), dtype=torch.int64, device="cpu")


@rnn_backward.register_fake
def _rnn_backward_fake(config: str, handle: Tensor, d_outputs: list[Tensor | None], d_finals: list[Tensor | None],
                       inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
                       params: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    return (inputs.new_empty(inputs.shape), [s.new_empty(s.shape) for s in initial_state],
            [p.new_empty(p.shape) for p in params])


# -- autograd ----------------------------------------------------------------------------------------
def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    config_text, x, lengths, states, params = inputs
    ctx.config, ctx.n_states = config_text, len(states)
    ctx.save_for_backward(output[2], x, lengths, *states, *params)


def _backward(ctx: Any, d_outputs: list[Tensor | None], d_finals: list[Tensor | None],
              _d_handle: Any) -> tuple[Any, ...]:
    handle, x, lengths, *rest = ctx.saved_tensors
    states, params = rest[:ctx.n_states], rest[ctx.n_states:]
    d_x, d_states, d_params = rnn_backward(ctx.config, handle, list(d_outputs), list(d_finals), x, lengths,
                                           list(states), list(params))
    return None, d_x, None, d_states, d_params


rnn_vjp.register_autograd(_backward, setup_context=_setup_context)


# -- eager: one autograd.Function, the same work without the custom ops' dispatch ------------------
class _EagerRNN(torch.autograd.Function):
    """Eager mode's training call: :func:`_run` and :func:`_backward_impl` as the ops run them, with the
    backward closure on the autograd node itself (freed with the graph). A custom op's Python dispatch
    costs ~0.25 ms more per training step than this (docs/torch.md); under ``torch.compile`` the layer
    calls the ops instead."""

    @staticmethod
    def forward(ctx: Any, config_text: str, inputs: Tensor, sequence_length: Tensor | None, n_states: int,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        cfg = parse_config(config_text)
        states, params = list(tensors[:n_states]), list(tensors[n_states:])
        outs, finals, back = _run(cfg, inputs, sequence_length, states, params, True)
        ctx.cfg, ctx.back, ctx.n_states, ctx.n_outs = cfg, back, n_states, len(outs)
        ctx.save_for_backward(inputs, sequence_length, *tensors)
        ctx.set_materialize_grads(False)
        return (*outs, *finals)

    @staticmethod
    @once_differentiable  # no double backward: differentiating the gradients again is an error, never zeros
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Any, ...]:
        inputs, lengths, *tensors = ctx.saved_tensors
        back, ctx.back = ctx.back, None
        n = ctx.n_states
        d_x, d_states, d_params = _backward_impl(ctx.cfg, back, list(grads[:ctx.n_outs]), list(grads[ctx.n_outs:]),
                                                 inputs, lengths, tensors[:n], tensors[n:])
        return (None, d_x, None, None, *d_states, *d_params)


_OPS_ALWAYS = False


def ops_always(flag: bool) -> bool:
    """Make eager calls go through the custom ops too (as compiled graphs do); returns the old setting.
    For tests and debugging: the numbers are the same, the dispatch costs more."""
    global _OPS_ALWAYS
    old, _OPS_ALWAYS = _OPS_ALWAYS, bool(flag)
    return old


def call(config_text: str, inputs: Tensor, sequence_length: Tensor | None, initial_state: list[Tensor],
         params: list[Tensor], train: bool) -> tuple[list[Tensor], list[Tensor]]:
    """The layer's forward: (outputs, final states), ``train`` with autograd. Traced (``torch.compile``)
    or with :func:`ops_always`: the custom ops; eager: :class:`_EagerRNN` / :func:`_run` directly."""
    if _OPS_ALWAYS or torch.compiler.is_compiling():
        if train:
            outs, finals, _ = rnn_vjp(config_text, inputs, sequence_length, initial_state, params)
            return outs, finals
        return rnn(config_text, inputs, sequence_length, initial_state, params)
    cfg = parse_config(config_text)
    if not train:
        outs, finals, _ = _run(cfg, inputs, sequence_length, initial_state, params, False)
        return outs, finals
    results = _EagerRNN.apply(config_text, inputs, sequence_length, len(initial_state), *initial_state, *params)
    n = cfg.directions
    return list(results[:n]), list(results[n:])
