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

The DSL only records declarations and where they were made (file and line);
:mod:`cellgen.spec` validates them and freezes them into a ``CellSpec``.
"""

from __future__ import annotations

import inspect
import math
import os
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


@dataclass
class VectorDecl:
    """A named vector of the cell: the input, a state, a per-unit parameter or a gate."""

    symbol: sympy.Symbol
    kind: str  # "input" | "state" | "param" | "gate" | "new"
    size: sympy.Expr
    where: Where
    init: float | str = 0.0  # for "param": constant or "uniform"
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

    def __post_init__(self) -> None:
        self.created_at = _caller()

    # -- sizes ---------------------------------------------------------------------
    def size(self, name: str) -> sympy.Symbol:
        """Declare an extra size (e.g. ``num_proj``), given by keyword at call time."""
        _check_identifier(name, "size")
        sym = sympy.Symbol(name, positive=True, integer=True)
        self.sizes[name] = sym
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
        return self._vector(name, "param", size, init=init)

    def hyper(self, name: str, default: float) -> sympy.Symbol:
        """A scalar hyperparameter given by keyword at call time (``math.inf`` disables a clip)."""
        _check_identifier(name, "hyper")
        sym = sympy.Symbol(name, real=True)
        self.hypers[name] = HyperDecl(sym, float(default), _caller())
        return sym

    def updated(self, state: sympy.Symbol) -> sympy.Symbol:
        """The value ``state`` has *after* the step (resolved from its ``update``)."""
        name = f"{state}__new"
        if name not in self.vectors:
            decl = self.vectors.get(str(state))
            size = decl.size if decl is not None else NUM_UNITS
            self.vectors[name] = VectorDecl(sympy.Symbol(name, real=True), "new", size, _caller(),
                                            state=str(state))
        return self.vectors[name].symbol

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
        if isinstance(gates, int):
            names = [f"{_identifier(kernel)}_{k}" for k in range(gates)] if gates > 1 else [_identifier(kernel)]
        else:
            names = list(gates)
        symbols = []
        for gname in names:
            symbols.append(self._vector(gname, "gate", size, where=where))
        self.linears.append(LinearDecl(kernel, bias, float(bias_init), tuple(sympy.sympify(o) for o in operands),
                                       tuple(symbols), size, where))
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
        _check_identifier(name, kind)
        sym = sympy.Symbol(name, real=True)
        decl = VectorDecl(sym, kind, sympy.sympify(size), where or _caller(), init=init)
        if name in self.vectors or name in self.hypers:
            decl.kind = "duplicate:" + kind
            self.vectors[name + "#dup"] = decl
        else:
            self.vectors[name] = decl
        return sym


_DSL_FILE = os.path.abspath(__file__)


def _caller() -> Where:
    """The first frame outside this module: the spec file line that made the call.

    Frames of generated code (``<string>``, e.g. the dataclass ``__init__`` that calls
    ``Cell.__post_init__``) are skipped, so ``Cell(...)`` is placed on its spec line.
    """
    outside = [f for f in inspect.stack()[1:] if os.path.abspath(f.filename) != _DSL_FILE]
    for frame in outside:
        if not frame.filename.startswith("<"):
            return Where(frame.filename, frame.lineno)
    if outside:  # pragma: no cover - a Cell built in an interactive session
        return Where(outside[0].filename, outside[0].lineno)
    return Where("<unknown>", 0)  # pragma: no cover


def _identifier(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _check_identifier(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{what} name {name!r} must be a Python identifier")


INF = math.inf
