"""The reference backend's template context: the spec's equations unfused, one NumPy step.

The reference backend is the oracle of the generated module itself (a step in plain NumPy, no
fusion, no hoisting); the tests' independent references live in ``tests/references.py``.

Each value is printed once, as a named variable (:mod:`cellgen.codegen.names`): each state's new
value (``new_c``), the output, every activation of gates (``sig_f``) and every subexpression the
equations use more than once. Naming rewrites no expression (the printer prints a named
subexpression by its name), so the step computes exactly what the equations written out would.
"""

from __future__ import annotations

from typing import Any

import sympy

from cellgen.codegen.names import Describer, Namer
from cellgen.codegen.printing import NumPyVectorPrinter, print_index
from cellgen.ir.adjoint import derive
from cellgen.ir.analysis import linear_order
from cellgen.ir.plan import FusedPlan


def context(plan: FusedPlan) -> dict[str, Any]:
    """Everything ``templates/reference/kernels.py.j2`` needs: the unfused spec printed for NumPy."""
    spec, p = plan.spec, NumPyVectorPrinter()
    order = _live(spec, linear_order(spec))
    gates = {g: str(g) for lin in spec.linears for g in lin.gates}
    words = {v.symbol: v.name for v in (spec.input, *spec.states, *spec.params)}
    words |= {h.symbol: h.name for h in spec.hypers}

    def atom_word(e: sympy.Expr) -> tuple[str, str] | None:
        if e in gates:
            return "gate", gates[e]
        return ("word", words[e]) if e in words else None

    names: dict[sympy.Expr, str] = {}
    describer = Describer(atom_word, {g: k for k, g in enumerate(gates.values())}, names, {})
    namer = Namer()
    updates = [expr for _, expr, _ in spec.updates]
    for (state, _, _), expr in zip(spec.updates, updates, strict=True):
        if _nameable(expr) and expr not in names:
            names[expr] = namer.fresh(f"new_{state}")
    if _nameable(spec.output) and spec.output not in names:
        names[spec.output] = namer.fresh("output")
    operands = [op for lin in order for op in lin.operands]
    every = [*operands, *updates, spec.output]
    for e in every:
        describer.name_activations(e, namer, whole=True)
    for e in sorted(_repeated(every), key=sympy.count_ops):  # smaller first: a larger one is named after them
        if e not in names:
            names[e] = namer.fresh(describer.base(e))

    emitted: set[sympy.Expr] = set()

    def assignments(exprs) -> list[dict[str, str]]:
        """The named values ``exprs`` need that are not printed yet, each after its parts."""
        lines = []
        for expr in exprs:
            for e in _postorder(expr):
                if e in names and e not in emitted:
                    emitted.add(e)
                    lines.append({"name": names[e], "value": p.define(e)})
        return lines

    p.names = names
    linears = []
    for lin in order:
        linears.append({"assignments": assignments(lin.operands),
                        "operands": [p.doprint(o) for o in lin.operands], "kernel": lin.kernel, "bias": lin.bias,
                        "gates": [str(g) for g in lin.gates]})
    final = assignments([*updates, spec.output])
    used = set().union(*(e.free_symbols for e in every))
    return {
        "linears": linears,
        "assignments": final,
        "updates": [p.doprint(expr) for expr in updates],
        "output": p.doprint(spec.output),
        "hypers": [h.name for h in spec.hypers if h.symbol in used],
        "unit_params": [v.name for v in spec.params if v.symbol in used],
        "backward": backward_context(plan),
    }


def _live(spec, order: list) -> list:
    """The linears (in ``order``) whose gates the updates and the output read, directly or through
    other live linears: a linear nothing reads computes nothing observable."""
    needed = set().union(*(e.free_symbols for _, e, _ in spec.updates), spec.output.free_symbols)
    live = []
    for lin in reversed(order):  # a linear's readers come after it
        if needed & set(lin.gates):
            live.append(lin)
            needed |= set().union(*(o.free_symbols for o in lin.operands))
    return live[::-1]


def _nameable(expr: sympy.Expr) -> bool:
    """Worth a variable: not a name, a number or a negated name (``-v_cell_clip``); and printed
    as one operand wherever it stands (a negative-looking term prints as a subtraction)."""
    return not (expr.is_Atom or expr.could_extract_minus_sign() or
                (isinstance(expr, sympy.Pow) and expr.exp.is_negative))


def _repeated(exprs) -> list[sympy.Expr]:
    """The subexpressions met more than once, outermost first (one met only inside a repeated
    one is not: it is computed once, as part of it)."""
    seen: set[sympy.Expr] = set()
    repeated: dict[sympy.Expr, None] = {}

    def visit(e: sympy.Expr) -> None:
        if e in seen and _nameable(e):
            repeated[e] = None
            return
        seen.add(e)
        for a in e.args:
            visit(a)

    for e in exprs:
        visit(e)
    return list(repeated)


def _postorder(expr: sympy.Expr):
    for a in expr.args:
        yield from _postorder(a)
    yield expr


def backward_context(plan: FusedPlan) -> dict[str, Any]:
    """The reference backward step: the adjoint equations (:mod:`cellgen.ir.adjoint`) unfused,
    each linear's transposed products written out, whole-batch NumPy. The linears run in reverse
    dependency order: a linear's d_gates read the operand adjoints of the linears after it."""
    spec = plan.spec
    order = _live(spec, linear_order(spec))
    delay = plan.delay_states[0] if plan.delay_states else None
    adj = derive(spec, tuple(order), delay)
    p = NumPyVectorPrinter()
    p.names = {adj.d_out: "d_out"}
    p.names |= {sym: f"d_new[{k}]" for k, sym in enumerate(adj.d_new.values())}
    p.names |= {sym: f"d_opnd_{k}" for k, sym in enumerate(adj.d_opnd.values())}
    made = (sympy.Symbol(f"_e{k}", real=True) for k in range(10**6))

    def printed(exprs: list[sympy.Expr]) -> tuple[list[dict[str, str]], list[str]]:
        temps, reduced = sympy.cse(exprs, symbols=made, order="none")
        p.names |= {t: str(t) for t, _ in temps}
        return [{"name": str(t), "value": p.doprint(e)} for t, e in temps], [p.doprint(e) for e in reduced]

    linears = []
    for lin in reversed(order):
        temps, gates = printed([adj.gates[g] for g in lin.gates])
        row = sympy.Integer(0)
        parts = []
        for op, size in zip(lin.operands, lin.operand_sizes, strict=True):
            if op == spec.input.symbol:
                target = "d_x"
            elif delay is not None and op == spec.state(delay).symbol:
                target = "d_x_prev"
            else:
                target = f"d_opnd_{adj.operands.index(op)}"
            parts.append({"rows": f"{print_index(row)}:{print_index(row + size)}", "target": target,
                          "value": p.doprint(op)})
            row = row + size
        linears.append({"kernel": lin.kernel, "index": order.index(lin), "temps": temps, "gates": gates,
                        "parts": parts})
    final, values = printed([*adj.states.values(), *adj.params.values(), adj.x, adj.x_prev])
    n = len(adj.states)
    read = set().union(*(e.free_symbols for e in (*adj.gates.values(), *adj.states.values(), *adj.params.values(),
                                                    adj.x, adj.x_prev, *(o for lin in order for o in lin.operands))))
    return {
        "linears": linears,
        "final_temps": final,
        "gate_splits": [{"index": k, "gates": [str(g) for g in lin.gates], "kernel": lin.kernel, "bias": lin.bias,
                         "read": any(g in read for g in lin.gates)}
                        for k, lin in enumerate(order)],
        "operands": len(adj.operands),
        "states": [{"name": name, "value": v} for name, v in zip(adj.states, values[:n], strict=True)],
        "params": dict(zip(adj.params, values[n:n + len(adj.params)], strict=True)),
        "x": values[-2],
        "x_prev": values[-1],
    }
