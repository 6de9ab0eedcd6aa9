"""``cellgen.torch``: a generated cell as a ``torch.nn.Module``, trained by torch autograd (docs/torch.md).

    import cellgen.torch
    layer = cellgen.torch.RNN("basic_lstm", input_size=32, num_units=64)      # batch_first=True
    outputs, state = layer(x, sequence_length=lengths)                       # state: the module's State
    outputs.sum().backward()                                                  # through dynamic_rnn_vjp

* :class:`RNN` holds the cell's parameters as ``nn.Parameter`` s; ``state_dict()`` keys are the TF
  variable names of the generated module (``kernel``, ``gates/kernel``, ...; ``fw/...`` and ``bw/...``
  when bidirectional), so a dict from ``init_params`` or TF loads unchanged.
* Traced, the forward and the backward are three ``torch.library.custom_op`` s (:mod:`cellgen.torch_ops`):
  ``cellgen::rnn`` (inference), ``cellgen::rnn_vjp`` (the forward that saves, returning a handle to
  its saved values) and ``cellgen::rnn_backward`` (the generated fused backward), with
  ``register_autograd`` and ``register_fake``: ``torch.compile(model, fullgraph=True)`` traces a model
  with the layer in it without a graph break. Eager, the same work runs in one ``autograd.Function``
  (less dispatch per call).
* CPU tensors cross as NumPy views (``Tensor.numpy()`` / ``torch.from_numpy``, no copy); CUDA tensors
  with ``backend="cuda"`` through ``__cuda_array_interface__`` (no copy).
* :meth:`RNN.from_torch` / :meth:`RNN.to_torch` convert ``nn.LSTM`` (``basic_lstm``) and ``nn.GRU``
  (``gru_cudnn``) exactly; :class:`MultiRNN` stacks layers of any cells (TF's ``MultiRNNCell``).

This module imports torch; ``import cellgen`` never imports it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cellgen import torch_ops
from cellgen.torch_ops import Config

__all__ = ["MultiRNN", "RNN", "DTYPES"]

#: The dtypes the layer computes in (the generated kernels' float32 and float64).
DTYPES = (torch.float32, torch.float64)
#: PyTorch's LSTM gate blocks are (i, f, g, o), TF's BasicLSTMCell columns (i, j, f, o) with j = g:
#: block k of one is block _LSTM_PERM[k] of the other (the permutation is its own inverse).
_LSTM_PERM = (0, 2, 1, 3)
_TORCH_CELLS = {"basic_lstm": "nn.LSTM", "gru_cudnn": "nn.GRU"}


def _cell_module(cell: Any) -> ModuleType:
    """A generated module as it is, or ``cellgen.load`` of a name or spec path."""
    if isinstance(cell, ModuleType):
        if not hasattr(cell, "dynamic_rnn_vjp"):
            raise ValueError(f"cell must be a generated cell module with dynamic_rnn_vjp, got module {cell.__name__} "
                             "(rebuild it with this cellgen)")
        return cell
    if isinstance(cell, str | os.PathLike):
        import cellgen

        return cellgen.load(cell)
    raise ValueError(f"cell must be a generated module, a shipped cell's name or a spec file's path, got "
                     f"{type(cell).__name__}")


def _attribute(name: str, taken: set[str]) -> str:
    """A Python attribute name for a TF variable name (``gates/kernel`` -> ``gates_kernel``), unique."""
    base = re.sub(r"\W", "_", name) or "param"
    if base[0].isdigit():
        base = "_" + base
    attr, k = base, 2
    while attr in taken:
        attr, k = f"{base}_{k}", k + 1
    taken.add(attr)
    return attr


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


class RNN(nn.Module):
    """``tf.nn.dynamic_rnn`` (or ``bidirectional_dynamic_rnn``) of one generated cell, as a module.

    ``cell``: a generated module (``generated.lstm``, ``cellgen.load("lstm")``), a shipped cell's name
    or a spec file's path. ``sizes_and_hyper``: the cell's extra sizes (``num_proj=16``) and
    hyperparameters (``forget_bias=0.5``, ``cell_clip=3.0``). ``seed``: the initialisers' seed (default:
    drawn from torch's generator, so ``torch.manual_seed`` decides it). ``recompute``: the vjp's
    ``recompute=True`` (sqrt(T) checkpoints). ``forward(inputs, sequence_length=None,
    initial_state=None)`` returns ``(outputs, state)`` (bidirectional: ``((out_fw, out_bw), (state_fw,
    state_bw))``, TF's results).
    """

    def __init__(self, cell: Any, input_size: int, num_units: int, *, batch_first: bool = True,
                 backend: str = "cpu", dtype: torch.dtype = torch.float32, device: Any = None,
                 bidirectional: bool = False, recompute: bool = False, seed: int | None = None,
                 **sizes_and_hyper: Any) -> None:
        super().__init__()
        module = _cell_module(cell)
        self.State = module.State
        for what, value in (("input_size", input_size), ("num_units", num_units)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        self.input_size, self.num_units = int(input_size), int(num_units)
        self.batch_first, self.bidirectional, self.recompute = bool(batch_first), bool(bidirectional), bool(recompute)
        self.dtype = _check_dtype(dtype)
        unknown = sorted(set(sizes_and_hyper) - set(module.SIZES) - set(module.HYPER))
        if unknown:
            raise ValueError(f"unknown keyword argument(s) {', '.join(unknown)} for cell {module.NAME}; its sizes: "
                             f"{', '.join(module.SIZES) or 'none'}; its hyperparameters: "
                             f"{', '.join(module.HYPER) or 'none'}")
        self.sizes = {k: sizes_and_hyper[k] for k in module.SIZES if k in sizes_and_hyper}
        self.hyper = {k: float(math.inf if v is None else v) for k, v in sizes_and_hyper.items() if k in module.HYPER}
        backends = getattr(getattr(module, "_CELL", None), "backends", {})
        if backend not in backends:
            raise ValueError(f"backend must be one of {', '.join(backends)}, got {backend!r}")
        self.backend = backend
        self._shapes = module.param_shapes(self.input_size, self.num_units, **self.sizes)  # checks the sizes
        self.output_size = int(module.output_size(self.num_units, **self.sizes))
        self.state_size = module.State(*map(int, module.state_size(self.num_units, input_size=self.input_size,
                                                                   **self.sizes)))
        self.directions = ("fw", "bw") if self.bidirectional else ("",)
        self._scope_sep = "."  # MultiRNN sets "/": its cells' keys are cell_0/kernel, as TF's MultiRNNCell
        self._frozen: set[str] = set()
        self.config = Config(module.__name__, dict(self.hyper), backend, self.recompute, self.batch_first,
                             self.bidirectional, self.input_size, self.num_units, dict(self.sizes),
                             self.output_size, tuple(self.state_size), tuple(self._shapes)).text()
        # TF name -> attribute name: "kernel" -> "kernel", "gates/kernel" -> "gates_kernel", "fw/kernel" -> ...
        self._attrs: dict[str, str] = {}
        taken = set(dir(self)) | {"_attrs"}
        for direction in self.directions:
            for name in self._shapes:
                tf = f"{direction}/{name}" if direction else name
                self._attrs[tf] = _attribute(tf, taken)
        for tf, attr in self._attrs.items():
            shape = self._shapes[tf.split("/", 1)[1] if self.bidirectional else tf]
            self.register_parameter(attr, nn.Parameter(torch.empty(shape, dtype=self.dtype)))
        self.reset_parameters(seed)
        if device is not None:
            self.to(device)

    @property
    def cell(self) -> ModuleType:
        """The generated cell module."""
        return torch_ops.cell_module(torch_ops.parse_config(self.config))

    # -- parameters -----------------------------------------------------------------------------
    def reset_parameters(self, seed: int | None = None) -> None:
        """The module's ``init_params`` initialisers (glorot-uniform kernels, the spec's constant biases)."""
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        for k, direction in enumerate(self.directions):
            draw = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed + k
            fresh = self.cell.init_params(self.input_size, self.num_units, dtype=np_dtype, seed=draw, **self.sizes)
            with torch.no_grad():
                for name, value in fresh.items():
                    tensor = self._tensor(f"{direction}/{name}" if direction else name)
                    tensor.copy_(torch.from_numpy(value))

    def _tensor(self, tf_name: str) -> Tensor:
        return getattr(self, self._attrs[tf_name])

    def tf_parameters(self, direction: str | None = None) -> dict[str, Tensor]:
        """The parameters under their TF names, in the module's order (``direction``: "fw"/"bw" of a
        bidirectional layer, without the prefix)."""
        if direction is None:
            return {tf: self._tensor(tf) for tf in self._attrs}
        if direction not in self.directions or not direction:
            raise ValueError(f"direction must be one of {', '.join(d for d in self.directions if d) or 'None'}, "
                             f"got {direction!r}")
        return {tf.split("/", 1)[1]: self._tensor(tf) for tf in self._attrs if tf.startswith(direction + "/")}

    def _freeze(self, tf_names: Sequence[str]) -> None:
        """Make these parameters constant buffers (an ``nn.LSTM(bias=False)``'s biases: zeros, no gradient)."""
        for tf in tf_names:
            attr = self._attrs[tf]
            value = getattr(self, attr).detach().clone()
            delattr(self, attr)
            self.register_buffer(attr, value)
            self._frozen.add(tf)

    def _key_prefix(self, prefix: str) -> str:
        return prefix[:-1] + self._scope_sep if prefix.endswith(".") else prefix

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """``state_dict()`` under the TF names (``prefix`` + ``gates/kernel``)."""
        prefix = self._key_prefix(prefix)
        for tf in self._attrs:
            value = self._tensor(tf)
            destination[prefix + tf] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Read the TF-named keys (NumPy arrays too: an ``init_params`` dict loads as it is), then torch's
        own loading under the attribute names; missing keys are reported by their TF names."""
        ours = self._key_prefix(prefix)
        found = {}
        for tf, attr in self._attrs.items():
            for key in (ours + tf, prefix + tf):  # a MultiRNN hands its cells cell_0.<tf name>
                if key in state_dict:
                    value = state_dict.pop(key)
                    found[prefix + attr] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                    break
        state_dict.update(found)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        back = {prefix + attr: ours + tf for tf, attr in self._attrs.items()}
        missing_keys[before:] = [back.get(k, k) for k in missing_keys[before:]]

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in {**self.sizes, **self.hyper}.items())
        return (f"{self.cell.NAME}, input_size={self.input_size}, num_units={self.num_units}{extra}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}, dtype={self.dtype}"
                + (", bidirectional=True" if self.bidirectional else "") + (", recompute=True" if self.recompute
                                                                            else ""))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, inputs: Tensor, sequence_length: Any = None, initial_state: Any = None) -> tuple[Any, Any]:
        x = self._check_inputs(inputs)
        batch = x.shape[0] if self.batch_first else x.shape[1]
        lengths = _lengths(sequence_length, batch)
        states = self._initial_states(initial_state, x, batch)
        params = [self._tensor(tf) for tf in self._attrs]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)
                                                  or any(s.requires_grad for s in states))
        outputs, finals = torch_ops.call(self.config, x, lengths, states, params, needs_grad)
        n = len(self.State._fields)
        if self.bidirectional:
            return (outputs[0], outputs[1]), (self.State(*finals[:n]), self.State(*finals[n:]))
        return outputs[0], self.State(*finals)

    def _check_inputs(self, inputs: Any) -> Tensor:
        layout = "[batch_size, max_time, input_size]" if self.batch_first else "[max_time, batch_size, input_size]"
        if not isinstance(inputs, Tensor):
            raise ValueError(f"inputs must be a torch.Tensor {layout}, got {type(inputs).__name__}")
        if inputs.dim() != 3 or inputs.shape[2] != self.input_size:
            raise ValueError(f"inputs must have shape {layout} with input_size={self.input_size}, got "
                             f"{tuple(inputs.shape)}")
        if inputs.dtype != self.dtype:
            raise ValueError(f"inputs must have the layer's dtype {self.dtype} (layers compute in torch.float32 or "
                             f"torch.float64; build the layer with dtype=...), got {inputs.dtype}")
        device = self._tensor(next(iter(self._attrs))).device
        if inputs.device != device:
            raise ValueError(f"inputs are on {inputs.device}, the layer's parameters on {device}: move one of them")
        if inputs.device.type != "cpu" and self.backend != "cuda":
            raise ValueError(f"inputs are on {inputs.device}, but backend={self.backend!r} runs on the host: use "
                             f"backend='cuda' for CUDA tensors, or CPU tensors")
        return inputs

    def _initial_states(self, initial_state: Any, x: Tensor, batch: int) -> list[Tensor]:
        """The initial states as one list (fw then bw when bidirectional); [] for zeros."""
        if initial_state is None:
            return []
        if self.bidirectional:
            if not isinstance(initial_state, tuple | list) or len(initial_state) != 2:
                raise ValueError("initial_state of a bidirectional layer must be a pair (state_fw, state_bw); "
                                 "either may be None (zeros)")
            parts = [self._state(s, x, batch, f"initial_state[{k}]") for k, s in enumerate(initial_state)]
            return [t for part in parts for t in part]
        return self._state(initial_state, x, batch, "initial_state")

    def _state(self, state: Any, x: Tensor, batch: int, name: str) -> list[Tensor]:
        fields = self.State._fields
        if state is None:
            return [x.new_zeros((batch, n)) for n in self.state_size]
        if isinstance(state, Tensor) and len(fields) == 1:
            state = (state,)
        if not isinstance(state, tuple | list) or len(state) != len(fields):
            raise ValueError(f"{name} must be a {self.cell.NAME}.State of {len(fields)} tensors ({', '.join(fields)})")
        out = []
        for field, size, value in zip(fields, self.state_size, state, strict=True):
            if not isinstance(value, Tensor) or tuple(value.shape) != (batch, size):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name}.{field} must be a tensor of shape [batch_size, {field}_size] = "
                                 f"({batch}, {size}), got {got}")
            if value.dtype != self.dtype or value.device != x.device:
                raise ValueError(f"{name}.{field} must have the inputs' dtype {self.dtype} and device {x.device}, "
                                 f"got {value.dtype} on {value.device}")
            out.append(value)
        return out

    # -- PyTorch's own LSTM / GRU ---------------------------------------------------------------
    @classmethod
    def from_torch(cls, rnn: nn.Module, *, backend: str = "cpu") -> RNN:
        """A layer computing exactly what ``rnn`` computes: ``nn.LSTM`` -> ``basic_lstm`` (forget_bias
        0: the two torch biases summed), ``nn.GRU`` -> ``gru_cudnn`` (the same gate order, kernels
        transposed). One layer; ``bias=False`` gives constant zero biases; ``batch_first``, dtype,
        device and ``bidirectional`` are kept."""
        if isinstance(rnn, nn.LSTM):
            name = "basic_lstm"
        elif isinstance(rnn, nn.GRU):
            name = "gru_cudnn"
        else:
            raise ValueError(f"from_torch takes an nn.LSTM or nn.GRU, got {type(rnn).__name__}")
        if rnn.num_layers != 1:
            raise ValueError(f"from_torch takes a one-layer {type(rnn).__name__} (num_layers=1), got num_layers="
                             f"{rnn.num_layers}: stack layers with cellgen.torch.MultiRNN")
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"from_torch: nn.LSTM(proj_size={rnn.proj_size}) has no cellgen counterpart here "
                             "(proj_size must be 0)")
        weight = rnn.weight_ih_l0
        module = _shipped_module(name)
        extra = {"forget_bias": 0.0} if name == "basic_lstm" else {}
        layer = cls(module, rnn.input_size, rnn.hidden_size, batch_first=rnn.batch_first, backend=backend,
                    dtype=_check_dtype(weight.dtype), device=weight.device, bidirectional=rnn.bidirectional,
                    seed=0, **extra)
        for direction in layer.directions:
            suffix = "_reverse" if direction == "bw" else ""
            w = {k: getattr(rnn, f"{k}_l0{suffix}", None) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            tf = _tf_from_torch(name, w, rnn.hidden_size)
            with torch.no_grad():
                for key, value in tf.items():
                    layer._tensor(f"{direction}/{key}" if direction else key).copy_(value)
        if not rnn.bias:
            layer._freeze([tf for tf in layer._attrs if tf.rsplit("/", 1)[-1] == "bias"])
        return layer

    def to_torch(self) -> nn.Module:
        """The ``nn.LSTM`` (basic_lstm) / ``nn.GRU`` (gru_cudnn) that computes what this layer computes:
        the TF bias (plus ``forget_bias`` in the f block) becomes ``bias_ih``, ``bias_hh`` zeros (LSTM)."""
        name = self.cell.NAME
        if name not in _TORCH_CELLS:
            raise ValueError(f"to_torch converts {', '.join(f'{k} ({v})' for k, v in _TORCH_CELLS.items())}; "
                             f"this layer's cell is {name}")
        bias = not self._frozen
        cls = nn.LSTM if name == "basic_lstm" else nn.GRU
        device = self._tensor(next(iter(self._attrs))).device
        out = cls(self.input_size, self.num_units, num_layers=1, bias=bias, batch_first=self.batch_first,
                  bidirectional=self.bidirectional, dtype=self.dtype, device=device)
        for direction in self.directions:
            suffix = "_reverse" if direction == "bw" else ""
            tf = self.tf_parameters(direction) if direction else self.tf_parameters()
            weights = _torch_from_tf(name, {k: v.detach() for k, v in tf.items()}, self.num_units,
                                     self.hyper.get("forget_bias", self.cell.HYPER.get("forget_bias", 0.0)))
            with torch.no_grad():
                for key, value in weights.items():
                    if key.startswith("bias") and not bias:
                        continue
                    getattr(out, f"{key}_l0{suffix}").copy_(value)
        return out


def _shipped_module(name: str) -> ModuleType:
    """The shipped cell ``name``: the repository's ``generated.<name>`` when it is on the path (a checkout:
    no build), else ``cellgen.load(name)``."""
    try:
        import importlib

        module = importlib.import_module(f"generated.{name}")
        if getattr(module, "NAME", None) == name and hasattr(module, "dynamic_rnn_vjp"):
            return module
    except ImportError:
        pass
    import cellgen

    return cellgen.load(name)


def _blocks(a: Tensor, n: int, order: Sequence[int], dim: int) -> Tensor:
    width = a.shape[dim] // n
    return torch.cat([a.narrow(dim, k * width, width) for k in order], dim=dim)


def _tf_from_torch(name: str, w: Mapping[str, Tensor | None], hidden: int) -> dict[str, Tensor]:
    """nn.LSTM / nn.GRU layer-0 weights ``[gates*H, in]`` -> the TF parameters of basic_lstm / gru_cudnn."""
    w_ih, w_hh = w["weight_ih"].detach(), w["weight_hh"].detach()
    zeros = w_ih.new_zeros(w_ih.shape[0])
    b_ih = zeros if w["bias_ih"] is None else w["bias_ih"].detach()
    b_hh = zeros if w["bias_hh"] is None else w["bias_hh"].detach()
    if name == "basic_lstm":
        kernel = torch.cat([w_ih.T, w_hh.T], dim=0)
        return {"kernel": _blocks(kernel, 4, _LSTM_PERM, 1), "bias": _blocks(b_ih + b_hh, 4, _LSTM_PERM, 0)}
    return {"input/kernel": w_ih.T, "input/bias": b_ih, "recurrent/kernel": w_hh.T, "recurrent/bias": b_hh}


def _torch_from_tf(name: str, tf: Mapping[str, Tensor], hidden: int, forget_bias: float) -> dict[str, Tensor]:
    """The inverse of :func:`_tf_from_torch` (LSTM: ``forget_bias`` moved into bias_ih's f block)."""
    if name == "basic_lstm":
        kernel = _blocks(tf["kernel"], 4, _LSTM_PERM, 1)
        rows = tf["kernel"].shape[0] - hidden
        bias = _blocks(tf["bias"], 4, _LSTM_PERM, 0).clone()
        if forget_bias:
            bias[hidden:2 * hidden] += forget_bias  # torch block 1 is f
        return {"weight_ih": kernel[:rows].T, "weight_hh": kernel[rows:].T, "bias_ih": bias,
                "bias_hh": torch.zeros_like(bias)}
    return {"weight_ih": tf["input/kernel"].T, "weight_hh": tf["recurrent/kernel"].T, "bias_ih": tf["input/bias"],
            "bias_hh": tf["recurrent/bias"]}


def _lengths(sequence_length: Any, batch: int) -> Tensor | None:
    """``sequence_length`` as an int64 tensor [batch] (None: every row runs max_time steps)."""
    if sequence_length is None:
        return None
    lengths = sequence_length if isinstance(sequence_length, Tensor) else torch.as_tensor(np.asarray(sequence_length))
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"sequence_length must have shape [batch_size] = ({batch},), got {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"sequence_length must hold integers, got dtype {lengths.dtype}")
    return lengths.to(torch.int64)


class MultiRNN(nn.Module):
    """TF's ``dynamic_rnn(MultiRNNCell(cells))``: :class:`RNN` layers of any cells, bottom to top.

    Each layer sees the outputs of the one below (zero past each row's length, as ``cellgen.multi_rnn``);
    ``forward(inputs, sequence_length=None, initial_states=None)`` returns (the top layer's outputs, a
    tuple of each layer's State). Autograd runs layer by layer through each layer's op. ``state_dict()``
    keys are TF's: ``cell_0/kernel``, ``cell_1/gates/kernel``, ...
    """

    def __init__(self, layers: Sequence[RNN]) -> None:
        super().__init__()
        if isinstance(layers, RNN) or not isinstance(layers, Sequence) or not layers:
            raise ValueError("layers must be a non-empty list of cellgen.torch.RNN layers")
        for k, layer in enumerate(layers):
            if not isinstance(layer, RNN):
                raise ValueError(f"layers[{k}] must be a cellgen.torch.RNN, got {type(layer).__name__}")
            if layer.bidirectional:
                raise ValueError(f"layers[{k}] is bidirectional: MultiRNN stacks one-direction layers "
                                 "(TF's MultiRNNCell)")
            if layer.batch_first != layers[0].batch_first:
                raise ValueError(f"layers[{k}] has batch_first={layer.batch_first}, layers[0] "
                                 f"batch_first={layers[0].batch_first}: every layer must have the same layout")
            if k and layer.input_size != layers[k - 1].output_size:
                raise ValueError(f"layers[{k}] has input_size={layer.input_size}, but layers[{k - 1}] outputs "
                                 f"{layers[k - 1].output_size} values per step")
            layer._scope_sep = "/"
            self.add_module(f"cell_{k}", layer)
        self.batch_first = layers[0].batch_first

    @property
    def layers(self) -> list[RNN]:
        return list(self.children())  # type: ignore[arg-type]

    def forward(self, inputs: Tensor, sequence_length: Any = None,
                initial_states: Sequence[Any] | None = None) -> tuple[Tensor, tuple[Any, ...]]:
        layers = self.layers
        if initial_states is not None and (not isinstance(initial_states, Sequence)
                                           or len(initial_states) != len(layers)):
            raise ValueError(f"initial_states must hold one State (or None) per layer ({len(layers)})")
        outputs, states = inputs, []
        for k, layer in enumerate(layers):
            outputs, state = layer(outputs, sequence_length, None if initial_states is None else initial_states[k])
            states.append(state)
        return outputs, tuple(states)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """``cell_0/kernel`` -> torch's ``cell_0.kernel`` for the children's loading."""
        for k in range(len(self._modules)):
            scope = f"{prefix}cell_{k}/"
            for key in [key for key in state_dict if key.startswith(scope)]:
                state_dict[f"{prefix}cell_{k}." + key[len(scope):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
