"""Stage 4a (plan Loops -> kernel source lines): the epilogue loops of a plan printed for one dtype.

Shared by every backend whose kernels run the plan's elementwise loops (cpu, cuda). Temporaries
are named after the spec's gates and states (:mod:`cellgen.codegen.names`), uniquely over the
whole plan, whichever loops a kernel prints together.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from cellgen.codegen.names import Describer, LoopProgram, Namer, name_loop
from cellgen.codegen.printing import NumbaPrinter, atomic_minmax, print_index
from cellgen.ir.plan import OUT, PRE, X, X_PREV, FusedPlan, Loop, hyper_name, new_state_array, state_array

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

    def program(self, loop: Loop) -> LoopProgram:
        """``loop``'s named statements (every loop of the plan named at once, on first use)."""
        programs = self.__dict__.get("_programs")
        if programs is None:
            programs = self.__dict__["_programs"] = plan_programs(self.plan)
        found = programs.get(loop)
        return found if found is not None else plan_programs(self.plan, [loop])[loop]

    def loop(self, loop: Loop) -> LoopText:
        p, prog = self.printer, self.program(loop)
        p.names = prog.names
        try:
            lines = [f"{name} = {p.define(expr)}" for name, expr in prog.assignments]
            lines += [self.store(target, v if isinstance(v, str) else p.doprint(v)) for target, v in prog.stores]
        finally:
            p.names = {}
        return LoopText(print_index(loop.domain), "\n".join(lines))

    def store(self, target: sympy.Indexed, value: str) -> str:
        """The line storing the printed ``value`` into ``target`` (a backend may convert it first)."""
        return f"{self.printer.doprint(target)} = {value}"

    def masked_loop(self, loop: Loop) -> LoopText | None:
        p = self.printer
        lines = [self.store(s.target, p.doprint(s.masked)) for s in loop.stores
                 if s.masked is not None and s.masked != s.target]
        return LoopText(print_index(loop.domain), "\n".join(lines)) if lines else None


def plan_programs(plan: FusedPlan, loops: list[Loop] | None = None) -> dict[Loop, LoopProgram]:
    """Every loop of the plan (or just ``loops``) named: one namespace for all of them."""
    if loops is None:
        loops = [loop for e in plan.epilogues for loop in e.loops]
    gate_of = {i: gate for gate, load in plan.gate_loads for i in load.atoms(sympy.Indexed)}
    order = {gate: k for k, (gate, _) in enumerate(plan.gate_loads)}
    spec = plan.spec
    words = {state_array(s.name): s.name for s in spec.states}
    words |= {new_state_array(s.name): s.name for s in spec.states}
    words |= {plan.param_arrays[n]: n for n in plan.param_arrays}
    words[X] = spec.input.name
    if plan.delay_states:
        words[X_PREV] = plan.delay_states[0]
    hypers = {sympy.Symbol(hyper_name(h.name), real=True): h.name for h in spec.hypers}

    def atom_word(e: sympy.Expr) -> tuple[str, str] | None:
        if isinstance(e, sympy.Indexed):
            if e in gate_of:
                return "gate", gate_of[e]
            base = str(e.base)
            return ("word", words[base]) if base in words else None
        return ("word", hypers[e]) if e in hypers else None

    targets = {state_array(n): f"new_{n}" for n in plan.recurrent_states}
    targets |= {new_state_array(n): f"new_{n}" for n in plan.recurrent_states}
    targets |= {g.operand_buffer: f"operand{g.stage}" for g in plan.gemms if g.operand_buffer is not None}
    targets[OUT] = "output"

    def target_base(target: sympy.Indexed) -> str:
        return targets.get(str(target.base), "tmp")

    namer = Namer()
    programs = {}
    for loop in loops:
        made = (sympy.Symbol(f"_mx{k}", real=True) for k in range(1_000_000))  # as unnamed printing had them
        temps, values = atomic_minmax(loop.temps, [s.value for s in loop.stores], made.__next__)
        minmax = {s for s, _ in temps} - {s for s, _ in loop.temps}
        describer = Describer(atom_word, order, {}, dict(t for t in temps if t[0] in minmax))
        programs[loop] = name_loop(temps, values, [s.target for s in loop.stores], minmax, describer,
                                   target_base, namer)
    return programs
