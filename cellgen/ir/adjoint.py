"""Backpropagation through one time step, derived symbolically from the spec's equations.

One step of a cell reads *leaves* (the states before the step, the input ``x``, the delay
state ``x_{t-1}``, per-unit parameters and the gate values, i.e. every ``linear``'s result) and
produces the states' new values, the output and the *operands* of its linears. Given the
adjoints (gradients of the loss) of what it produces, the chain rule gives the adjoint of every
leaf as an elementwise SymPy expression:

    d_leaf = sum_s d_new[s] * dU_s/d_leaf + d_out * dY/d_leaf + sum_e d_opnd[e] * de/d_leaf

where ``e`` runs over the distinct operands of the linears that are not the input itself or the
delay state (those go to the inputs' gradient through one GEMM after the loop), and
``d_opnd[e] = sum over (linear, k) with operand k == e of d_gates(linear) @ W_k^T`` is the
transposed GEMM of a backward step. A gate's adjoint is its linear's ``d_gates``. Hyper-
parameters are constants.

The derivative rules are SymPy's (``sigmoid' = s*(1 - s)`` on the sigmoid itself,
``tanh' = 1 - tanh**2``), except for the piecewise functions, which follow TensorFlow's
gradients: ``Max``/``Min`` pass the gradient to the argument that wins, ties to the
non-constant one (``tf.clip_by_value`` is ``minimum(maximum(v, lo), hi)``; TF's
``_MaximumGrad``/``_MinimumGrad`` give ties to ``v``); ``Max(v, 0)`` (a relu) passes it where
``v > 0`` (``tf.nn.relu``'s gradient); ``Abs(v)`` multiplies it by ``sign(v)`` (0 at 0).
The indicator functions :class:`ge` and :class:`gt` print as selects.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from cellgen.frontend.spec import CellSpec, Linear, SpecError


class ge(sympy.Function):  # noqa: N801 - a printed function, named like the comparison
    """1 where ``a >= b``, else 0 (a gradient's selector); its own derivative is 0."""

    nargs = 2

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sympy.Integer(0)


class gt(sympy.Function):  # noqa: N801
    """1 where ``a > b``, else 0."""

    nargs = 2

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return sympy.Integer(0)


def _priority(args: tuple[sympy.Expr, ...]) -> list[sympy.Expr]:
    """Max/Min arguments in tie-break order: the ones that depend on the step's values first."""
    return [a for a in args if a.free_symbols] + [a for a in args if not a.free_symbols]


def _selector(expr: sympy.Expr, arg: sympy.Expr) -> sympy.Expr:
    """1 where ``arg`` is the value of the Max/Min ``expr`` (ties: the earlier in _priority)."""
    args = _priority(expr.args)
    is_max = isinstance(expr, sympy.Max)
    if is_max and len(args) == 2 and args[1] == 0:  # relu: tf.nn.relu's gradient, v > 0
        return gt(args[0], 0) if arg == args[0] else gt(0, args[0])
    k = args.index(arg)
    factors = []
    for i, other in enumerate(args):
        if i == k:
            continue
        strict = i < k  # an earlier argument wins a tie
        a, b = (arg, other) if is_max else (other, arg)
        factors.append(gt(a, b) if strict else ge(a, b))
    return sympy.Mul(*factors)


def derivative(expr: sympy.Expr, x: sympy.Symbol, where: tuple[str, int, str] | None = None) -> sympy.Expr:
    """``d expr / d x`` for an elementwise expression, with TensorFlow's piecewise gradients."""
    if not expr.has(x):
        return sympy.Integer(0)
    if expr == x:
        return sympy.Integer(1)
    if isinstance(expr, sympy.Max | sympy.Min):
        return sympy.Add(*(_selector(expr, a) * derivative(a, x, where) for a in expr.args if a.has(x)))
    if isinstance(expr, sympy.Abs):
        (a,) = expr.args
        return (gt(a, 0) - gt(0, a)) * derivative(a, x, where)
    if expr.is_Add:
        return sympy.Add(*(derivative(a, x, where) for a in expr.args))
    if expr.is_Mul:
        terms = []
        for k, a in enumerate(expr.args):
            if a.has(x):
                rest = sympy.Mul(*(b for i, b in enumerate(expr.args) if i != k))
                terms.append(rest * derivative(a, x, where))
        return sympy.Add(*terms)
    if expr.is_Pow:
        base, exp = expr.args
        if not exp.has(x):
            return exp * base ** (exp - 1) * derivative(base, x, where)
        return expr * (derivative(exp, x, where) * sympy.log(base) + exp * derivative(base, x, where) / base)
    if isinstance(expr, sympy.Function) and len(expr.args) == 1:
        try:
            outer = expr.fdiff(1)
        except sympy.ArgumentIndexError:
            outer = None
        if outer is not None and not isinstance(outer, sympy.Derivative | sympy.Subs):
            return outer * derivative(expr.args[0], x, where)
    path, line, gate = where or ("<spec>", 0, "expression")
    raise SpecError(path, line, gate, f"cannot differentiate {expr} (cellgen differentiates +, *, powers, "
                                      "sigmoid, tanh, exp, log, sqrt, Abs, Min and Max)")


@dataclass(frozen=True)
class StepAdjoint:
    """The adjoints of one step's leaves, as expressions of the leaves and these adjoint symbols.

    ``d_out``: the output's adjoint; ``d_new[state]``: each recurrent state's new value's;
    ``operands``: the distinct recurrent operands ``e`` of the live linears with ``d_opnd[e]``.
    """

    spec: CellSpec
    live: tuple[Linear, ...]
    delay: str | None  # the delay state (x_{t-1}), if any
    d_out: sympy.Symbol
    d_new: dict[str, sympy.Symbol]
    operands: tuple[sympy.Expr, ...]
    d_opnd: dict[sympy.Expr, sympy.Symbol]
    gates: dict[sympy.Symbol, sympy.Expr]  # each live gate -> d_gate
    states: dict[str, sympy.Expr]  # each recurrent state -> the adjoint of its value before the step
    params: dict[str, sympy.Expr]  # each per-unit parameter read -> its adjoint (summed over rows and steps)
    x: sympy.Expr  # the elementwise part of the input's adjoint (the linears' part is a GEMM)
    x_prev: sympy.Expr  # the elementwise part of the delay state's (x_{t-1}) adjoint


def _reverse_mode(produced: list[tuple[sympy.Expr, sympy.Symbol, tuple[str, int, str]]]):
    """``leaf -> its adjoint``: the chain rule from the produced values' adjoints, through their shared parts.

    A value produced twice (the output is the new h) is differentiated once with the sum of its
    adjoints. A produced value inside another (the new c inside the new h = o * tanh(new c)) is an
    intermediate: it gets a symbol, its total adjoint (its own plus what every value containing it
    sends it) is formed once, and its leaves' adjoints are that total times its own derivative:
    ``d_c_total * dc/df``, not ``d_new_c * dc/df + d_h * dh/dc * dc/df`` with the product spread
    out, so the factor is computed once per step (CSE) instead of multiplied out in every gate's adjoint.
    """
    merged: dict[sympy.Expr, tuple[sympy.Expr, tuple[str, int, str]]] = {}
    for expr, adj, where in produced:
        total, first = merged.get(expr, (sympy.Integer(0), where))
        merged[expr] = (total + adj, first)
    exprs = list(merged)
    inner = {e: sympy.Symbol(f"_inner{k}", real=True) for k, e in enumerate(exprs)
             if not e.is_Atom and any(o != e and o.has(e) for o in exprs)}
    reduced = {e: e.xreplace({i: sym for i, sym in inner.items() if i != e}) for e in exprs}
    back = {sym: e for e, sym in inner.items()}
    totals: dict[sympy.Expr, sympy.Expr] = {}

    def total(e: sympy.Expr) -> sympy.Expr:
        """The whole adjoint of produced value ``e`` (its own and, if inner, every container's share)."""
        if e not in totals:
            adj, _ = merged[e]
            if e in inner:
                adj += sympy.Add(*(total(o) * derivative(reduced[o], inner[e], merged[o][1])
                                   for o in exprs if o != e and reduced[o].has(inner[e])))
            totals[e] = adj
        return totals[e]

    def adjoint(leaf: sympy.Symbol) -> sympy.Expr:
        value = sympy.Add(*(total(e) * derivative(reduced[e], leaf, merged[e][1]) for e in exprs))
        while value.has(*back):
            value = value.xreplace(back)
        return value

    return adjoint


def is_hoisted_operand(spec: CellSpec, delay: str | None, operand: sympy.Expr) -> bool:
    """An operand whose adjoint goes to the inputs through a GEMM: ``x`` itself or the delay state."""
    return operand == spec.input.symbol or (delay is not None and operand == spec.state(delay).symbol)


def derive(spec: CellSpec, live: tuple[Linear, ...], delay: str | None) -> StepAdjoint:
    """The chain rule through one step of ``spec`` (``live``: the linears that compute something)."""
    d_out = sympy.Symbol("d_out", real=True)
    recurrent = [s for s in spec.states if s.name != delay]
    d_new = {s.name: sympy.Symbol(f"d_new_{k}", real=True) for k, s in enumerate(recurrent)}
    operands: list[sympy.Expr] = []
    for lin in live:
        for op in lin.operands:
            if not is_hoisted_operand(spec, delay, op) and op not in operands:
                operands.append(op)
    d_opnd = {op: sympy.Symbol(f"d_opnd_{k}", real=True) for k, op in enumerate(operands)}
    produced: list[tuple[sympy.Expr, sympy.Symbol, tuple[str, int, str]]] = []
    for name, expr, line in spec.updates:
        if name in d_new:
            produced.append((expr, d_new[name], (spec.path, line, f"update of {name}")))
    produced.append((spec.output, d_out, (spec.path, spec.output_line, "output")))
    line_of_operand = {op: lin.line for lin in live for op in lin.operands}
    for op in operands:
        produced.append((op, d_opnd[op], (spec.path, line_of_operand[op], "linear operand")))

    adjoint = _reverse_mode(produced)

    gates = {g: adjoint(g) for lin in live for g in lin.gates}
    states = {s.name: adjoint(s.symbol) for s in recurrent}
    read = set().union(*(expr.free_symbols for expr, _, _ in produced))
    params = {p.name: adjoint(p.symbol) for p in spec.params if p.symbol in read}
    x_prev = adjoint(spec.state(delay).symbol) if delay is not None else sympy.Integer(0)
    return StepAdjoint(spec, live, delay, d_out, d_new, tuple(operands), d_opnd, gates, states, params,
                       adjoint(spec.input.symbol), x_prev)
