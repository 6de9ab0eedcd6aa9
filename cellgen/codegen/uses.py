"""Stage 4a (plan Loops -> kernel names): which kernel variables a loop's code reads or writes.

Every kernel's parameter list is derived from this, on the IR (the loops' SymPy expressions),
never by searching printed code: an array is an ``Indexed``'s base, renamed the way the
backend's printer renames it (``pre`` -> ``pre_t``, a per-step view); a size is a free symbol
of an index, a domain or a value (printed ``n_<size>``); a hyperparameter is its ``hy_`` symbol.
A loop's own temporaries and the unit index are local. Any other symbol is a compiler bug.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import sympy

from cellgen.ir.plan import UNIT, FusedPlan, Loop, hyper_name, size_name


def loop_exprs(loop: Loop, masked: bool = True) -> list[sympy.Expr]:
    """Every expression a loop's code prints: domain, temps, store targets and values, and
    (``masked``) the stores made past a row's sequence length."""
    exprs: list[sympy.Expr] = [sympy.sympify(loop.domain)]
    exprs += [e for _, e in loop.temps]
    for s in loop.stores:
        exprs += [s.target, s.value]
        if masked and s.masked is not None:
            exprs.append(s.masked)
    return exprs


def kernel_names(plan: FusedPlan, loops: Iterable[Loop], arrays: Mapping[str, str] | None = None,
                 masked: bool = True) -> set[str]:
    """The kernel variables the printed ``loops`` use (``arrays`` renames plan arrays to views)."""
    arrays = arrays or {}
    sizes = {s: size_name(str(s)) for s in plan.spec.all_sizes}
    hypers = {hyper_name(h.name) for h in plan.spec.hypers}
    names: set[str] = set()
    for loop in loops:
        local = {sym for sym, _ in loop.temps} | {UNIT}
        for expr in loop_exprs(loop, masked):
            labels = set()
            for indexed in expr.atoms(sympy.Indexed):
                base = str(indexed.base)
                names.add(arrays.get(base, base))
                labels.add(indexed.base.label)
            for sym in expr.free_symbols:
                if isinstance(sym, sympy.Indexed | sympy.IndexedBase) or sym in local or sym in labels:
                    continue
                if sym in sizes:
                    names.add(sizes[sym])
                elif sym.name in hypers:
                    names.add(sym.name)
                else:
                    raise AssertionError(f"cellgen bug: loop symbol {sym} is no size, hyper, temp or index")
    return names
