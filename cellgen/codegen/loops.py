"""Stage 4a (plan Loops -> kernel source lines): the epilogue loops of a plan printed for one dtype.

Shared by every backend whose kernels run the plan's elementwise loops (cpu, cuda).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from cellgen.codegen.printing import NumbaPrinter, atomic_minmax, print_index
from cellgen.ir.plan import OUT, PRE, X, FusedPlan, Loop

#: Per-step views the kernels index instead of the [T, ...] arrays.
STEP_VIEWS = {PRE: "pre_t", X: "x_t", OUT: "out_t"}


@dataclass(frozen=True)
class LoopText:
    domain: str
    body: str


class KernelPrinter:
    """Prints one plan's epilogue loops for one dtype, as the CPU/GPU templates need them."""

    def __init__(self, plan: FusedPlan, dtype: str, fast_tanh: str | None = None,
                 arrays: dict[str, str] | None = None, row: str = "b",
                 rows: dict[str, str] | None = None) -> None:
        self.plan = plan
        self.printer = NumbaPrinter(dtype, plan.batched_arrays, row=row, fast_tanh=fast_tanh,
                                    arrays=STEP_VIEWS if arrays is None else arrays, rows=rows)

    def loop(self, loop: Loop) -> LoopText:
        p = self.printer
        names = (sympy.Symbol(f"_mx{k}", real=True) for k in range(1_000_000))
        temps, store_values = atomic_minmax(loop.temps, [s.value for s in loop.stores], lambda: next(names))
        lines = [f"{p.doprint(sym)} = {p.doprint(expr)}" for sym, expr in temps]
        values = []
        for k, expr in enumerate(store_values):
            value = p.doprint(expr)
            if isinstance(expr, sympy.Symbol):  # a temporary: already read before any store
                values.append(value)
            else:  # an array read too: a Loop reads every value before it stores any (plan.Loop)
                lines.append(f"_v{k} = {value}")
                values.append(f"_v{k}")
        lines += [f"{p.doprint(s.target)} = {v}" for s, v in zip(loop.stores, values, strict=True)]
        return LoopText(print_index(loop.domain), "\n".join(lines))

    def masked_loop(self, loop: Loop) -> LoopText | None:
        p = self.printer
        lines = [f"{p.doprint(s.target)} = {p.doprint(s.masked)}" for s in loop.stores
                 if s.masked is not None and s.masked != s.target]
        return LoopText(print_index(loop.domain), "\n".join(lines)) if lines else None

