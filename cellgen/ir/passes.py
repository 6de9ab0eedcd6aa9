"""Stage 3 (FusedPlan -> FusedPlan): pure rewriting passes over the epilogue expressions."""

from __future__ import annotations

import dataclasses

import sympy

from cellgen.frontend.dsl import sigmoid
from cellgen.ir.plan import Epilogue, FusedPlan, Loop, Store, new_state_array, state_array

_W = sympy.Wild("w")


def stable_rewrites(expr: sympy.Expr) -> sympy.Expr:
    """Rewrite hand-written logistic forms into ``sigmoid``, which prints without overflow.

    >>> x = sympy.Symbol("x")
    >>> stable_rewrites(1 / (1 + sympy.exp(-x)))
    sigmoid(x)
    """
    if not expr.has(sympy.exp):  # both forms hold an exp; matching the patterns costs more than this test
        return expr
    expr = expr.replace(1 / (1 + sympy.exp(-_W)), lambda w: sigmoid(w))
    return expr.replace(sympy.exp(_W) / (1 + sympy.exp(_W)), lambda w: sigmoid(w))


def _map_stores(plan: FusedPlan, fn) -> FusedPlan:
    epilogues = tuple(
        Epilogue(e.index, tuple(fn(loop) for loop in e.loops)) for e in plan.epilogues
    )
    return dataclasses.replace(plan, epilogues=epilogues)


def stabilise(plan: FusedPlan) -> FusedPlan:
    """Apply :func:`stable_rewrites` to every store."""

    def loop_fn(loop: Loop) -> Loop:
        stores = tuple(dataclasses.replace(s, value=stable_rewrites(s.value)) for s in loop.stores)
        return dataclasses.replace(loop, stores=stores)

    return _map_stores(plan, loop_fn)


def eliminate_common_subexpressions(plan: FusedPlan) -> FusedPlan:
    """One ``sympy.cse`` per loop: shared work (a gate's sigmoid, the new c) computed once."""
    counter = iter(range(1_000_000))

    def loop_fn(loop: Loop) -> Loop:
        symbols = (sympy.Symbol(f"t{next(counter)}", real=True) for _ in iter(int, 1))
        temps, reduced = sympy.cse([s.value for s in loop.stores], symbols=symbols, order="none")
        stores = tuple(Store(s.target, v, s.masked) for s, v in zip(loop.stores, reduced, strict=True))
        return Loop(loop.domain, tuple(loop.temps) + tuple(temps), stores)

    return _map_stores(plan, loop_fn)


def update_in_place(plan: FusedPlan) -> FusedPlan:
    """Store a state's new value over its old one when nothing reads the old value later.

    "Later" is every loop after the one that stores it: within that loop every value is read
    before any store is made (:class:`cellgen.ir.plan.Loop`), so its own loop may read the old value.

    Every other state stays double-buffered (``sn_h``, swapped after the step).
    Rows past their sequence length then need no copy: their in-place state is kept.
    A plan whose time loop may not overwrite states (``TimeLoop.in_place`` False) is returned as it is.
    """
    if not plan.time_loop.in_place:
        return plan
    loops = [loop for epi in plan.epilogues for loop in epi.loops]

    def reads(loop: Loop) -> set[str]:
        exprs = [e for _, e in loop.temps] + [s.value for s in loop.stores]
        return {str(i.base) for e in exprs for i in sympy.sympify(e).atoms(sympy.Indexed)}

    in_place: set[str] = set()
    for name in plan.recurrent_states:
        new, old = new_state_array(name), state_array(name)
        where = next(k for k, loop in enumerate(loops) if any(str(s.target.base) == new for s in loop.stores))
        if not any(old in reads(loop) for loop in loops[where + 1:]):
            in_place.add(name)

    old_of = {new_state_array(name): state_array(name) for name in in_place}

    def loop_fn(loop: Loop) -> Loop:
        stores = []
        for s in loop.stores:
            name = str(s.target.base)
            if name in old_of:
                s = Store(sympy.Indexed(sympy.IndexedBase(old_of[name]), *s.target.indices), s.value, None)
            stores.append(s)
        return dataclasses.replace(loop, stores=tuple(stores))

    plan = _map_stores(plan, loop_fn)
    batched = tuple(a for a in plan.batched_arrays if a not in old_of)
    return dataclasses.replace(plan, batched_arrays=batched,
                               double_buffered=tuple(n for n in plan.recurrent_states if n not in in_place))


#: The passes `cellgen build` runs, in order.
DEFAULT_PASSES = (stabilise, eliminate_common_subexpressions, update_in_place)


def run_passes(plan: FusedPlan, passes=DEFAULT_PASSES) -> FusedPlan:
    for p in passes:
        plan = p(plan)
    return plan
