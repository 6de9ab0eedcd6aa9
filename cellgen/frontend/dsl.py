"""Stage 0 (what a spec file writes): the cell-description DSL.

A spec file builds one :class:`Cell` and describes a single time step with SymPy
expressions. Every vector (the input, a state, a per-unit parameter, a gate of a
``linear``) is a SymPy ``Symbol``; arithmetic on vectors is elementwise. Example,
TensorFlow's BasicLSTMCell::

    from cellgen.dsl import Cell, sigmoid, tanh

    cell = Cell("basic_lstm")
    x = cell.input()
    c, h = cell.state("c"), cell.state("h")
    forget_bias = cell.hyper("forget_bias", 1.0)
    i, j, f, o = cell.linear([x, h], gates=("i", "j", "f", "o"), kernel="kernel", bias="bias")
    new_c = c * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j)
    new_h = tanh(new_c) * sigmoid(o)
    cell.update(c, new_c)
    cell.update(h, new_h)
    cell.output(new_h)

The DSL records declarations and where they were made (file and line) and checks
only the type and form of each argument (:class:`DeclarationError`); :mod:`cellgen.frontend.spec`
validates the declarations and freezes them into a ``CellSpec``. Every declared
name is NFKC-normalised, as Python normalises identifiers, so ``H`` and ``ℌ`` are
one name.
"""

from __future__ import annotations

import keyword
import math
import os
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import sympy
from sympy import Abs, Max, Min, exp, log, sqrt, tanh

__all__ = [
    "Abs", "Cell", "Max", "Min", "exp", "log", "relu", "sigmoid", "sqrt", "tanh",
    "INPUT_SIZE", "NUM_UNITS",
]

#: The size every input vector has unless declared otherwise (TF's ``input_size``).
INPUT_SIZE = sympy.Symbol("input_size", positive=True, integer=True)
#: The size every state and gate has unless declared otherwise (TF's ``num_units``).
NUM_UNITS = sympy.Symbol("num_units", positive=True, integer=True)
#: The named initialisers of ``cell.param(init=...)`` (``cellgen.runtime.params.init_params``);
#: any finite number is a constant initialiser.
INITIALISERS = ("uniform", "glorot_uniform")

#: Names a hyperparameter or size cannot have: hyperparameters are ``**hyper`` keywords of
#: dynamic_rnn / bidirectional_dynamic_rnn / cell, sizes ``**sizes`` keywords of init_params /
#: zero_state / param_shapes / state_size / output_size, next to these named arguments.
RESERVED: dict[str, tuple[str, ...]] = {
    "hyper": ("backend", "initial_state", "initial_state_bw", "initial_state_fw", "inputs", "params",
              "params_bw", "params_fw", "recompute", "sequence_length", "state", "time_major"),
    "size": ("batch_size", "dtype", "input_size", "num_units", "seed", "sizes"),
}


class DeclarationError(ValueError):
    """A DSL call with an argument of the wrong type or form; ``gate`` names the declaration."""

    def __init__(self, gate: str, message: str) -> None:
        self.gate, self.message = gate, message
        super().__init__(f"{gate}: {message}")


class sigmoid(sympy.Function):  # noqa: N801 - named like the math function it is
    """The logistic function 1 / (1 + exp(-x)); printed in a form that never overflows."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        s = sigmoid(self.args[0])
        return s * (1 - s)


def relu(expr: sympy.Expr) -> sympy.Expr:
    """max(x, 0), elementwise."""
    return Max(expr, 0)


@dataclass(frozen=True)
class Where:
    """The place in the spec file a declaration was made."""

    path: str
    line: int


@dataclass(frozen=True)
class NameDecl:
    """One declared name (a vector, hyperparameter or size), in declaration order."""

    name: str
    kind: str
    where: Where


@dataclass
class VectorDecl:
    """A named vector of the cell: the input, a state, a per-unit parameter or a gate."""

    symbol: sympy.Symbol
    kind: str  # "input" | "state" | "param" | "gate" | "new"
    size: sympy.Expr
    where: Where
    init: float | str = 0.0  # for "param": constant or one of INITIALISERS
    state: str | None = None  # for "new": the state whose updated value this is


@dataclass
class HyperDecl:
    """A scalar hyperparameter, passed at call time with a default (``forget_bias=1.0``)."""

    symbol: sympy.Symbol
    default: float
    where: Where


@dataclass
class LinearDecl:
    """``[operands...] @ kernel + bias``, split into ``len(gates)`` column blocks (TF layout)."""

    kernel: str
    bias: str | None
    bias_init: float
    operands: tuple[sympy.Expr, ...]
    gates: tuple[sympy.Symbol, ...]
    gate_size: sympy.Expr
    where: Where


@dataclass
class UpdateDecl:
    """``state <- expr`` at the end of the step."""

    state: sympy.Symbol
    expr: sympy.Expr
    where: Where


@dataclass
class Cell:
    """Everything one spec file declares about one RNN cell."""

    name: str
    doc: str = ""
    vectors: dict[str, VectorDecl] = field(default_factory=dict)
    hypers: dict[str, HyperDecl] = field(default_factory=dict)
    sizes: dict[str, sympy.Symbol] = field(default_factory=dict)
    linears: list[LinearDecl] = field(default_factory=list)
    updates: list[UpdateDecl] = field(default_factory=list)
    outputs: list[tuple[sympy.Expr, Where]] = field(default_factory=list)
    created_at: Where | None = None
    #: every declared name in order, duplicates included (the validator reports them)
    declared: list[NameDecl] = field(default_factory=list)
    #: ``cell.updated(s)``: state name -> a symbol of its own (a Dummy: no spec name can equal it)
    new_values: dict[str, VectorDecl] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.created_at = _caller()
        self.name = _check_identifier(self.name, "cell", gate="Cell")
        if not isinstance(self.doc, str):
            raise DeclarationError("Cell", f"doc must be a str, got {type(self.doc).__name__}")

    # -- sizes ---------------------------------------------------------------------
    def size(self, name: str) -> sympy.Symbol:
        """Declare an extra size (e.g. ``num_proj``), given by keyword at call time."""
        name = _check_identifier(name, "size")
        sym = sympy.Symbol(name, positive=True, integer=True)
        self.declared.append(NameDecl(name, "size", _caller()))
        self.sizes.setdefault(name, sym)
        return sym

    # -- vectors -------------------------------------------------------------------
    def input(self, name: str = "x", size: sympy.Expr = INPUT_SIZE) -> sympy.Symbol:
        """The input vector x_t of one step."""
        return self._vector(name, "input", size)

    def state(self, name: str, size: sympy.Expr = NUM_UNITS) -> sympy.Symbol:
        """A state vector; the symbol stands for its value *before* the step."""
        return self._vector(name, "state", size)

    def param(self, name: str, size: sympy.Expr = NUM_UNITS, init: float | str = "uniform") -> sympy.Symbol:
        """A per-unit parameter vector (e.g. a peephole diagonal ``w_f_diag``)."""
        return self._vector(name, "param", size, init=_check_init(init, f"param {name}"))

    def hyper(self, name: str, default: float) -> sympy.Symbol:
        """A scalar hyperparameter given by keyword at call time (``math.inf`` disables a clip)."""
        name = _check_identifier(name, "hyper")
        sym = sympy.Symbol(name, real=True)
        where = _caller()
        self.declared.append(NameDecl(name, "hyper", where))
        self.hypers.setdefault(name, HyperDecl(sym, _check_number(default, f"hyper {name}", "default"), where))
        return sym

    def updated(self, state: sympy.Symbol) -> sympy.Symbol:
        """The value ``state`` has *after* the step (resolved from its ``update``)."""
        if not isinstance(state, sympy.Symbol):
            raise DeclarationError("updated", f"expects a state symbol, got {type(state).__name__} {state}")
        name = str(state)
        if name not in self.new_values:
            decl = self.vectors.get(name)
            size = decl.size if decl is not None else NUM_UNITS
            self.new_values[name] = VectorDecl(sympy.Dummy(f"updated({name})", real=True), "new", size,
                                               _caller(), state=name)
        return self.new_values[name].symbol

    def linear(
        self,
        operands: Sequence[sympy.Expr],
        gates: int | Sequence[str] = 1,
        *,
        kernel: str,
        bias: str | None = "bias",
        bias_init: float = 0.0,
        size: sympy.Expr = NUM_UNITS,
    ) -> sympy.Symbol | tuple[sympy.Symbol, ...]:
        """``concat(operands) @ kernel + bias`` split into gates of ``size`` each.

        The kernel has rows = the operands' sizes in order and columns = gates in
        order, exactly TensorFlow's layout, so TF weights load by name. Returns one
        symbol per gate (a single symbol when there is one gate).
        """
        where = _caller()
        label = f"linear {kernel!r}"
        _check_param_name(kernel, label, "kernel")
        if bias is not None:
            _check_param_name(bias, label, "bias")
        bias_init = _check_number(bias_init, label, "bias_init", finite=True)
        names = _gate_names(gates, kernel, label)
        symbols = [self._vector(gname, "gate", size, where=where) for gname in names]
        self.linears.append(LinearDecl(kernel, bias, bias_init, _operands(operands, label), tuple(symbols),
                                       sympy.sympify(size), where))
        return symbols[0] if len(symbols) == 1 else tuple(symbols)

    # -- the step's results --------------------------------------------------------
    def update(self, state: sympy.Symbol, expr: sympy.Expr) -> None:
        """Declare the state's value after the step."""
        self.updates.append(UpdateDecl(state, sympy.sympify(expr), _caller()))

    def output(self, expr: sympy.Expr) -> None:
        """Declare the step's output (TF's ``output``, e.g. the new ``h``)."""
        self.outputs.append((sympy.sympify(expr), _caller()))

    # -- helpers -------------------------------------------------------------------
    def _vector(self, name: str, kind: str, size: sympy.Expr, *, init: float | str = 0.0,
                where: Where | None = None) -> sympy.Symbol:
        name = _check_identifier(name, kind)
        sym = sympy.Symbol(name, real=True)
        where = where or _caller()
        self.declared.append(NameDecl(name, kind, where))
        self.vectors.setdefault(name, VectorDecl(sym, kind, sympy.sympify(size), where, init=init))
        return sym


_DSL_FILE = os.path.abspath(__file__)


def _caller() -> Where:
    """The first frame outside this module: the spec file line that made the call.

    Frames of generated code (``<string>``, e.g. the dataclass ``__init__`` that calls
    ``Cell.__post_init__``) are skipped, so ``Cell(...)`` is placed on its spec line.
    """
    first = None
    frame = sys._getframe(1)  # frames only: inspect.stack() would read every frame's source lines
    while frame is not None:
        filename = frame.f_code.co_filename
        if os.path.abspath(filename) != _DSL_FILE:
            if not filename.startswith("<"):
                return Where(filename, frame.f_lineno)
            first = first or Where(filename, frame.f_lineno)
        frame = frame.f_back
    if first is not None:  # pragma: no cover - a Cell built in an interactive session
        return first
    return Where("<unknown>", 0)  # pragma: no cover


def _identifier(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _check_identifier(name: object, what: str, gate: str | None = None) -> str:
    """``name`` NFKC-normalised (as Python reads identifiers); it must be an identifier.

    ``gate`` (default ``"<what> <name>"``) names the declaration in the error.
    """
    gate = gate or (f"{what} {name}" if isinstance(name, str) else what)
    if not isinstance(name, str):
        raise DeclarationError(gate, f"{what} name must be a str, got {type(name).__name__} {name!r}")
    normal = unicodedata.normalize("NFKC", name)
    if not normal.isidentifier():
        hint = " (it names the generated module <name>.py)" if what == "cell" else ""
        raise DeclarationError(gate, f"{what} name {name!r} must be a Python identifier{hint}")
    if what == "cell" and (keyword.iskeyword(normal) or normal.startswith("__")):
        raise DeclarationError(gate, f"cell name {name!r} cannot name a module "
                               "(a Python keyword or a dunder name such as __init__)")
    if what == "state" and (keyword.iskeyword(normal) or normal.startswith("_")):
        raise DeclarationError(gate, f"state name {name!r} cannot be a field of the State namedtuple "
                               "(a Python keyword or a name starting with '_')")
    reserved = RESERVED.get(what, ())
    if normal in reserved:
        raise DeclarationError(gate, f"{what} name {name!r} is a keyword argument of the generated "
                               f"functions; reserved {what} names: {', '.join(reserved)}")
    return normal


def _check_param_name(name: object, label: str, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise DeclarationError(label, f"{what}= must be a non-empty str (the parameter's name), "
                               f"got {type(name).__name__} {name!r}")


def _check_number(value: object, label: str, what: str, *, finite: bool = False) -> float:
    """A real number (not a bool or str); ``finite``: neither inf nor nan."""
    try:
        if isinstance(value, str | bytes | bool):
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DeclarationError(label, f"{what} must be a real number, got {type(value).__name__} {value!r}") \
            from None
    if finite and not math.isfinite(number):
        raise DeclarationError(label, f"{what} must be finite, got {number!r} "
                               "(every output would be inf or nan from the first step)")
    return number


def _check_init(init: object, label: str) -> float | str:
    if isinstance(init, str):
        if init not in INITIALISERS:
            raise DeclarationError(label, f"init {init!r} is not an initialiser; use a finite number or one of "
                                   + ", ".join(map(repr, INITIALISERS)))
        return init
    return _check_number(init, label, "init", finite=True)


def _gate_names(gates: object, kernel: str, label: str) -> list[str]:
    """The gate names of a linear: ``gates`` is a count or a sequence of names (never one str)."""
    if isinstance(gates, str):
        raise DeclarationError(label, f"gates={gates!r} is a str; for one gate named {gates!r} write "
                               f"gates=({gates!r},), or pass a tuple of names or a count")
    if isinstance(gates, int) and not isinstance(gates, bool):
        if gates < 1:
            raise DeclarationError(label, f"gates={gates} must be at least 1")
        base = _identifier(kernel)
        return [f"{base}_{k}" for k in range(gates)] if gates > 1 else [base]
    if not isinstance(gates, Sequence) or not gates:
        raise DeclarationError(label, f"gates must be a count or a non-empty tuple of names, got {gates!r}")
    return [_check_identifier(g, "gate", gate=label) for g in gates]


def _operands(operands: object, label: str) -> tuple[sympy.Expr, ...]:
    if isinstance(operands, sympy.Basic) or not isinstance(operands, Sequence):
        raise DeclarationError(label, f"operands must be a list of vector expressions ([x, h]), got {operands!r}")
    try:
        return tuple(sympy.sympify(o, strict=True) for o in operands)
    except sympy.SympifyError as err:
        raise DeclarationError(label, f"an operand is not a SymPy expression: {err.expr!r}") from None


INF = math.inf
