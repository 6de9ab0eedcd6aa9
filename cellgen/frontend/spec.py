"""Stage 1 (spec file -> CellSpec): load a spec file, validate it, freeze it.

Every problem is a :class:`SpecError` naming the spec file, the line and the gate
(the update, linear or output being checked), so ``cellgen build`` can print one
line and exit non-zero without a traceback.
"""

from __future__ import annotations

import contextlib
import runpy
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy

from cellgen.frontend import dsl
from cellgen.frontend.dsl import INPUT_SIZE, NUM_UNITS, Cell, DeclarationError, Where

#: Seconds a spec file may run before ``load_spec`` stops it (``cellgen ... --timeout``; 0: no limit).
DEFAULT_TIMEOUT = 60.0

#: Functions a spec may use; everything is applied elementwise.
ELEMENTWISE_FUNCTIONS: tuple[type, ...] = (
    sympy.tanh, sympy.exp, sympy.log, dsl.sigmoid, sympy.Max, sympy.Min, sympy.Abs,
)


class SpecError(Exception):
    """A broken spec: names the file, the line and the gate."""

    def __init__(self, path: str | Path, line: int, gate: str, message: str) -> None:
        message = " ".join(str(message).split()) if "\n" in str(message) else str(message)  # always ONE line
        self.path, self.line, self.gate, self.message = str(path), line, gate, message
        super().__init__(f"{path}:{line}: {gate}: {message}")


@dataclass(frozen=True)
class Vector:
    """A named vector of the cell (input, state or per-unit parameter)."""

    name: str
    symbol: sympy.Symbol
    size: sympy.Expr
    line: int
    init: float | str = 0.0


@dataclass(frozen=True)
class Hyper:
    """A scalar hyperparameter with its default."""

    name: str
    symbol: sympy.Symbol
    default: float
    line: int


@dataclass(frozen=True)
class Linear:
    """One ``linear`` of the spec: operands, kernel/bias names and its gate symbols."""

    kernel: str
    bias: str | None
    bias_init: float
    operands: tuple[sympy.Expr, ...]
    operand_sizes: tuple[sympy.Expr, ...]
    gates: tuple[sympy.Symbol, ...]
    gate_size: sympy.Expr
    line: int

    @property
    def rows(self) -> sympy.Expr:
        """Kernel rows: the operand sizes, summed."""
        return sympy.Add(*self.operand_sizes)

    @property
    def columns(self) -> sympy.Expr:
        """Kernel columns: gates times gate size."""
        return len(self.gates) * self.gate_size

    @property
    def label(self) -> str:
        return f"linear {self.kernel!r} (gates {', '.join(map(str, self.gates))})"


@dataclass(frozen=True)
class CellSpec:
    """A validated cell: every expression refers only to declared vectors and hypers."""

    name: str
    path: str
    doc: str
    input: Vector
    states: tuple[Vector, ...]
    params: tuple[Vector, ...]
    hypers: tuple[Hyper, ...]
    sizes: tuple[sympy.Symbol, ...]
    linears: tuple[Linear, ...]
    updates: tuple[tuple[str, sympy.Expr, int], ...]  # (state, expr over old values, line), state order
    output: sympy.Expr
    output_line: int
    line: int = 0  # the spec line of ``Cell(...)``

    def state(self, name: str) -> Vector:
        return next(s for s in self.states if s.name == name)

    @property
    def all_sizes(self) -> tuple[sympy.Symbol, ...]:
        """input_size, num_units and the declared extra sizes, in that order."""
        return (INPUT_SIZE, NUM_UNITS, *self.sizes)

    def size_of(self, expr: sympy.Expr) -> sympy.Expr | None:
        """The vector size of an (already validated) elementwise expression; None for scalars."""
        sizes = {v.symbol: v.size for v in (self.input, *self.states, *self.params)}
        sizes.update({g: lin.gate_size for lin in self.linears for g in lin.gates})
        found = {sizes[s] for s in expr.free_symbols if s in sizes}
        return found.pop() if found else None


def load_spec(path: str | Path, timeout: float | None = DEFAULT_TIMEOUT) -> CellSpec:
    """Run the spec file (for at most ``timeout`` seconds) and validate the one ``Cell`` it builds.

    A spec file is trusted Python run with the user's rights (docs/dsl.md, "Trust model");
    whatever it raises, ``sys.exit`` included, becomes a SpecError. Only KeyboardInterrupt
    passes through.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(path, 0, "spec", "no such spec file")
    namespace = _run_spec(path, timeout)
    cells = list({id(v): v for v in namespace.values() if isinstance(v, Cell)}.values())  # `alias = cell` is one
    if len(cells) != 1:
        where = cells[1].created_at if len(cells) > 1 else None
        line = where.line if where is not None and Path(where.path) == path else 1
        raise SpecError(path, line, "spec", f"must build exactly one cellgen.dsl.Cell, found {len(cells)}")
    return validate(cells[0], path)


class _SpecTimeout(BaseException):
    """Raised in the spec file's frame when it ran past its time (a BaseException: `except Exception` can't eat it)."""


def _run_spec(path: Path, timeout: float | None) -> dict[str, Any]:
    """The spec file's namespace; every way it can fail is a SpecError (KeyboardInterrupt aside)."""
    try:
        with _time_limit(timeout):
            return runpy.run_path(str(path), run_name=f"cellgen_spec_{path.stem}")
    except (SpecError, KeyboardInterrupt):
        raise
    except _SpecTimeout as exc:
        raise SpecError(path, _spec_line(exc, path), "spec", f"did not finish within {timeout:g} s "
                        "(stopped there; raise the limit with --timeout SECONDS, 0 = none)") from None
    except DeclarationError as exc:  # a DSL call with a bad argument
        raise SpecError(path, _spec_line(exc, path), exc.gate, exc.message) from None
    except SystemExit as exc:
        raise SpecError(path, _spec_line(exc, path), "spec",
                        f"spec called sys.exit({exc.code!r}); a spec file must run to its end") from None
    except BaseException as exc:  # a Python error inside the spec file
        raise SpecError(path, _spec_line(exc, path), "spec", f"{type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise _SpecTimeout after ``seconds`` (POSIX, main thread); elsewhere, or for 0/None, no limit."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise _SpecTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-6), interval)


def _spec_line(exc: BaseException, path: Path) -> int:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    if not lines and isinstance(exc, SyntaxError):
        return exc.lineno or 0
    return lines[-1] if lines else 0


class _Validator:
    """Checks one Cell; each method raises SpecError with the gate it was checking."""

    def __init__(self, cell: Cell, path: Path) -> None:
        self.cell, self.path = cell, path
        self.sizes = {INPUT_SIZE, NUM_UNITS, *cell.sizes.values()}
        self.vectors = {d.symbol: d for d in cell.vectors.values()}
        self.hypers = {h.symbol for h in cell.hypers.values()}
        self._news: dict[sympy.Symbol, sympy.Expr] = {}

    def fail(self, where: Where | None, gate: str, message: str) -> SpecError:
        line = where.line if where is not None and Path(where.path) == self.path else 0
        return SpecError(self.path, line, gate, message)

    def check_declarations(self) -> None:
        self.check_unique_names()
        for key, decl in self.cell.vectors.items():
            if not self._is_size(decl.size):
                raise self.fail(decl.where, key, f"size {decl.size} is not a declared size ({self._size_names()})")
        inputs = [d for d in self.cell.declared if d.kind == "input"]
        if len(inputs) != 1:
            where = inputs[1].where if inputs else self.cell.created_at
            raise self.fail(where, "input", f"a cell has exactly one input, found {len(inputs)}")

    def check_unique_names(self) -> None:
        """One namespace for vectors, gates, hypers and sizes (NFKC-normalised by the DSL)."""
        first: dict[str, dsl.NameDecl] = {}
        for decl in self.cell.declared:
            if decl.name in (str(INPUT_SIZE), str(NUM_UNITS)) and decl.kind != "size":
                raise self.fail(decl.where, decl.name, f"name {decl.name!r} is the name of a size")
            if decl.name in first:
                old = first[decl.name]
                where = f" on line {old.where.line}" if Path(old.where.path) == self.path else ""
                raise self.fail(decl.where, decl.name, f"name {decl.name!r} is declared twice "
                                f"(first as a {old.kind}{where})")
            first[decl.name] = decl

    def _is_size(self, size: sympy.Expr) -> bool:
        return size in self.sizes

    def _size_names(self) -> str:
        return ", ".join(sorted(str(s) for s in self.sizes))

    def expr_size(self, expr: sympy.Expr, where: Where, gate: str) -> sympy.Expr | None:
        """Check ``expr`` is elementwise over declared names; return its vector size."""
        if isinstance(expr, sympy.Symbol):
            if expr in self.vectors:
                return self.vectors[expr].size
            if expr in self.hypers:
                return None
            raise self.fail(where, gate, f"undefined name {str(expr)!r} (declare it with cell.state/param/hyper)")
        if isinstance(expr, sympy.Number):
            if not expr.is_real:
                raise self.fail(where, gate, f"non-real constant {expr}")
            return None
        if isinstance(expr, (sympy.Add, sympy.Mul, *ELEMENTWISE_FUNCTIONS)):
            return self._common_size(expr.args, where, gate, type(expr).__name__)
        if isinstance(expr, sympy.Pow):
            if not expr.exp.is_Number:
                raise self.fail(where, gate, f"power {expr} needs a constant exponent")
            return self.expr_size(expr.base, where, gate)
        if isinstance(expr, sympy.Function):
            raise self.fail(where, gate, f"unknown function {type(expr).__name__!r}; use one of "
                            + ", ".join(f.__name__ for f in ELEMENTWISE_FUNCTIONS))
        raise self.fail(where, gate, f"non-elementwise operation {type(expr).__name__!r} in {expr}")

    def _common_size(self, args, where: Where, gate: str, op: str) -> sympy.Expr | None:
        sizes = {s for s in (self.expr_size(a, where, gate) for a in args) if s is not None}
        if len(sizes) > 1:
            raise self.fail(where, gate, f"size mismatch in {op}: operands have sizes "
                            + " and ".join(sorted(map(str, sizes))))
        return sizes.pop() if sizes else None

    def check_linears(self) -> list[Linear]:
        """Each linear's operands (``cell.updated`` resolved) and parameter names; gates are checked later."""
        linears: list[Linear] = []
        # parameter names are the params dict's keys: kernels, biases and per-unit params; a gate
        # may share its kernel's name (the default gates=1 names the gate after the kernel)
        names = {str(d.symbol): f"param {d.symbol}" for d in self.cell.vectors.values() if d.kind == "param"}
        for lin in self.cell.linears:
            label = f"linear {lin.kernel!r}"
            if not lin.operands:
                raise self.fail(lin.where, label, "needs at least one operand")
            if not self._is_size(lin.gate_size):
                raise self.fail(lin.where, label, f"gate size {lin.gate_size} is not a declared size")
            operands = tuple(self.substitute_new(o) for o in lin.operands)
            sizes = []
            for k, operand in enumerate(operands):
                size = self.expr_size(operand, lin.where, label)
                if size is None:
                    raise self.fail(lin.where, label, f"operand {k} ({operand}) is a scalar, expected a vector")
                sizes.append(size)
            for pname in (lin.kernel, lin.bias):
                if pname is None:
                    continue
                if pname in names:
                    raise self.fail(lin.where, label, f"parameter name {pname!r} is already used by {names[pname]}")
                names[pname] = label
            linears.append(Linear(lin.kernel, lin.bias, lin.bias_init, operands, tuple(sizes), lin.gates,
                                  lin.gate_size, lin.where.line))
        return linears

    def check_updates(self) -> dict[str, tuple[sympy.Expr, Where]]:
        states = {d.symbol: d for d in self.cell.vectors.values() if d.kind == "state"}
        updates: dict[str, tuple[sympy.Expr, Where]] = {}
        for upd in self.cell.updates:
            gate = f"update of {upd.state}"
            if upd.state not in states:
                raise self.fail(upd.where, gate, f"{upd.state} is not a state (declare it with cell.state)")
            if str(upd.state) in updates:
                raise self.fail(upd.where, gate, f"state {upd.state} is updated twice")
            updates[str(upd.state)] = (upd.expr, upd.where)
        for sym, decl in states.items():
            if str(sym) not in updates:
                raise self.fail(decl.where, f"state {sym}", "state is never updated (add cell.update)")
        if not states:
            raise self.fail(self.cell.created_at, "state", "a cell needs at least one state")
        return updates

    def resolve_new_values(self, updates: dict[str, tuple[sympy.Expr, Where]]) -> dict[str, sympy.Expr]:
        """Replace every ``cell.updated(s)`` by s's update expression; reject cycles."""
        news = {d.symbol: d.state for d in self.cell.new_values.values()}
        for decl in self.cell.new_values.values():
            if decl.state not in updates:
                raise self.fail(decl.where, f"updated({decl.state})", f"{decl.state} is not an updated state")
        resolved: dict[str, sympy.Expr] = {}

        def resolve(state: str, trail: tuple[str, ...]) -> sympy.Expr:
            if state in resolved:
                return resolved[state]
            expr, where = updates[state]
            if state in trail:
                cycle = " -> ".join((*trail[trail.index(state):], state))
                raise self.fail(where, f"update of {state}", f"cycle between updated states: {cycle}")
            subs = {s: resolve(news[s], (*trail, state)) for s in expr.free_symbols if s in news}
            resolved[state] = expr.xreplace(subs)
            return resolved[state]

        for state in updates:
            resolve(state, ())
        self._news = {s: resolved[st] for s, st in news.items()}
        return resolved

    def substitute_new(self, expr: sympy.Expr) -> sympy.Expr:
        return expr.xreplace(self._news)

    def check_gate_order(self, linears: list[Linear]) -> list[Linear]:
        """Operands may use gates only of linears that do not (transitively) need this one."""
        owner = {g: k for k, lin in enumerate(linears) for g in lin.gates}
        deps = {k: {owner[s] for op in lin.operands for s in op.free_symbols if s in owner}
                for k, lin in enumerate(linears)}
        state: dict[int, int] = {}

        def visit(k: int, trail: tuple[int, ...]) -> None:
            if state.get(k) == 2:
                return
            if state.get(k) == 1:
                cycle = " -> ".join(linears[i].kernel for i in (*trail[trail.index(k):], k))
                raise SpecError(self.path, linears[k].line, linears[k].label, f"cycle between linears: {cycle}")
            state[k] = 1
            for d in deps[k]:
                visit(d, (*trail, k))
            state[k] = 2

        for k in deps:
            visit(k, ())
        return linears


def validate(cell: Cell, path: str | Path) -> CellSpec:
    """Check a built Cell and freeze it into a CellSpec."""
    path = Path(path)
    v = _Validator(cell, path)
    v.check_declarations()
    updates = v.check_updates()
    resolved = v.resolve_new_values(updates)
    linears = v.check_linears()
    v.check_gate_order(linears)
    decls = cell.vectors
    for name, expr in resolved.items():
        where = updates[name][1]
        size = v.expr_size(expr, where, f"update of {name}")
        if size is not None and size != decls[name].size:
            raise v.fail(where, f"update of {name}", f"size mismatch: state has size {decls[name].size}, "
                         f"the update has size {size}")
    if len(cell.outputs) != 1:
        where = cell.outputs[1][1] if len(cell.outputs) > 1 else cell.created_at
        raise v.fail(where, "output", f"a cell declares exactly one output, found {len(cell.outputs)}")
    out_expr, out_where = cell.outputs[0]
    out_expr = v.substitute_new(out_expr)
    if v.expr_size(out_expr, out_where, "output") is None:
        raise v.fail(out_where, "output", "the output must be a vector, not a scalar")

    def vec(d: dsl.VectorDecl) -> Vector:
        return Vector(str(d.symbol), d.symbol, d.size, d.where.line, d.init)

    kinds = {kind: [vec(d) for d in decls.values() if d.kind == kind] for kind in ("input", "state", "param")}
    states = tuple(kinds["state"])
    return CellSpec(
        name=cell.name, path=str(path), doc=cell.doc, input=kinds["input"][0], states=states,
        params=tuple(kinds["param"]),
        hypers=tuple(Hyper(n, h.symbol, h.default, h.where.line) for n, h in cell.hypers.items()),
        sizes=tuple(cell.sizes.values()), linears=tuple(linears),
        updates=tuple((s.name, resolved[s.name], updates[s.name][1].line) for s in states),
        output=out_expr, output_line=out_where.line,
        line=cell.created_at.line if cell.created_at is not None else 0,
    )
