"""The differential fuzzer's parts: a hypothesis strategy that writes random LEGAL spec files, and an
evaluator of a spec's equations written here, independent of the generator.

* :func:`specs` draws a :class:`FuzzSpec`: the text of a spec file (1-3 states, at most one delay state,
  1-3 linears over the input, states, expressions of earlier gates and ``cell.updated(...)``, every
  elementwise function of the DSL, per-unit params, hypers, extra sizes, clips) whose names are drawn
  to collide with the names the generator uses for itself (``b``, ``j``, ``t``, ``out``, ``pre``,
  ``lambda`` ...). Every value stays finite and moderate: state updates are squashed (tanh, sigmoid,
  a clip or a sigmoid interpolation), ``log``/``sqrt``/negative powers see positive arguments
  (``1 + e**2``), ``exp`` sees bounded ones.
* :class:`Evaluator` walks the SymPy trees of the DSL's ``Cell`` (what the spec file built; not the
  generator's ``CellSpec``, printers or generated code) with TF 1.x ``dynamic_rnn`` semantics:
  ``concat(operands) @ kernel + bias`` split into gates in TF's column layout, zero outputs and frozen
  states past each row's length.
* :func:`check_spec` builds one spec text with ``cellgen.build.build``, imports the generated module
  under a unique name and compares ``backend="cpu"`` and ``backend="reference"`` (float64 and float32)
  with the evaluator.

Known bug classes (issue 9) are tags on a :class:`FuzzSpec`; ``specs(exclude={...})`` leaves a class
out so the rest of the space can be explored while a bug is open (``CELLGEN_FUZZ_EXCLUDE``).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
import runpy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import sympy
from hypothesis import strategies as st

from cellgen.frontend import dsl

#: Bug classes a spec may belong to (tags); ``exclude`` in :func:`specs` leaves them out.
CLASSES = (
    "old_read",           # the output or another state's update reads a state's value before the step
    "name_collision",     # names drawn from the generator's own (b, j, t, out, lengths, np, pre, lambda...)
    "updated_in_linear",  # a linear operand reads cell.updated(s)
    "int_gates",          # gates=<int> (the DSL names the gates after the kernel)
    "no_num_units",       # no vector of size num_units
    "input_units",        # the input is declared cell.input(size=NUM_UNITS)
    "param_only",         # a linear operand, an update or the output reads only per-unit params (no batch row)
    "dead_linear",        # a linear whose gates no update and no output reads
    "delay_read",         # a delay state (x_{t-1}) read in an expression, not as a whole linear operand
)

#: Names the generated code uses for itself (kernel loop variables, arrays, arguments, modules).
#: Not ``num_units`` / ``input_size``: those are the DSL's own size names, which no vector or
#: hyperparameter may take (a SpecError, tests/test_spec_errors.py).
GENERATOR_NAMES = (
    "b", "j", "t", "T", "B", "out", "lengths", "np", "math", "pre", "pre_t", "pre_prev", "pre0", "x_t",
    "x_prev", "xs", "w_in", "b_in", "sizes", "dtype", "params", "state", "hyper", "num_proj", "s_h", "p_k",
    "t0", "t1", "_v0", "_v1", "nth", "chunk", "q", "sync", "gemm_fn", "rec0",
    "opnd0", "s_c", "s_h_new", "h_new", "v_x", "_y", "new_state", "State", "cuda", "range", "min", "max",
    "len", "float", "prange", "njit", "_rt", "_gemm", "kernel", "bias", "b0", "b1", "s0", "s1", "tb",
    "thread", "serial", "packed", "recurrent", "w_hoisted", "b_hoisted", "b_zero", "finals", "inputs",
    "NAME", "KEY", "STATE", "HYPER", "SIZES", "cell", "h", "c", "x", "i", "f", "o", "g", "k", "self",
    "value", "result", "acc", "_acc0", "w", "bias_init", "ring", "first", "units",
    "new_c", "new_h", "new_c_max", "sig_f", "tanh_j", "g_i", "output", "operand1", "tmp",  # temporaries
)
#: Keywords are legal hyperparameter names (passed as ``**{"lambda": 0.5}``).
KEYWORD_HYPERS = ("lambda", "class", "in", "is", "def", "None", "yield")
#: Parameter (dict key) names: kernel and bias names may hold ``/``.
PARAM_NAMES = ("kernel", "bias", "b", "j", "w_in", "b_in", "gates/kernel", "gates/bias", "rnn/k", "p_k", "x_t",
               "pre", "out", "lengths", "np", "math", "T", "t", "k", "state", "params", "candidate/bias")
#: Keywords of the generated API: a size or a hyper with one of these names cannot be passed.
API_KEYWORDS = frozenset({
    "params", "inputs", "state", "sequence_length", "initial_state", "time_major", "backend", "params_fw",
    "params_bw", "initial_state_fw", "initial_state_bw", "input_size", "num_units", "dtype", "seed",
    "batch_size", *(name for names in dsl.RESERVED.values() for name in names),
})
CELL_NAMES = ("np", "math", "cell", "State", "numba", "gemm", "runtime", "out", "t", "b", "lengths")

#: Small sizes, all different so a mixed-up size shows; shapes this small run the serial kernels.
INPUT_SIZE, NUM_UNITS, EXTRA_SIZES = 3, 4, (2, 5)
BATCH, STEPS = 5, 4
#: Expression magnitudes above this are squashed, so float32 keeps its digits.
CAP = 30.0


def mangle(name: str) -> str:
    return re.sub(r"\W", "_", name)


@dataclass(frozen=True)
class FuzzSpec:
    """One drawn spec: its file text, the bug classes it exercises and how to call it."""

    text: str
    classes: frozenset[str]
    sizes: Mapping[str, int]  # extra size name -> value
    input_size: int
    num_units: int
    hyper: Mapping[str, float | None]  # keyword arguments of the call (None: "off", for an inf default)
    seed: int

    def __str__(self) -> str:  # hypothesis prints the falsifying example with this
        return (f"FuzzSpec(classes={sorted(self.classes)}, sizes={dict(self.sizes)}, hyper={dict(self.hyper)}, "
                f"seed={self.seed})\n{self.text}")

    __repr__ = __str__


@dataclass(frozen=True)
class Atom:
    """A vector the spec can read: its Python text in the spec, size key, magnitude bound, classes."""

    text: str
    size: str
    mag: float
    tags: frozenset[str] = frozenset()


@dataclass
class _Names:
    """Draws unique names; with ``collide`` most come from the generator's own names."""

    draw: Callable[[st.SearchStrategy[Any]], Any]
    collide: bool
    used: set[str] = field(default_factory=set)
    collided: bool = False
    counter: itertools.count = field(default_factory=itertools.count)

    def take(self, name: str) -> bool:
        if mangle(name) in self.used:
            return False
        self.used.add(mangle(name))
        return True

    def fresh(self, kind: str) -> str:
        if self.collide and self.draw(st.booleans()):
            pool: Sequence[str] = GENERATOR_NAMES
            if kind in ("state", "input"):
                pool = [n for n in GENERATOR_NAMES if not n.startswith("_")]
            elif kind == "hyper":
                pool = [n for n in (*GENERATOR_NAMES, *KEYWORD_HYPERS) if n not in API_KEYWORDS]
            elif kind == "size":
                pool = [n for n in GENERATOR_NAMES if n not in API_KEYWORDS]
            elif kind == "pname":
                pool = PARAM_NAMES
            name = self.draw(st.sampled_from(pool))
            if self.take(name):
                self.collided = True
                return name
        while True:
            name = f"{kind[0]}{next(self.counter)}v"
            if self.take(name):
                return name


def _num(draw: Callable, choices: Sequence[float]) -> str:
    return repr(draw(st.sampled_from(choices)))


@dataclass
class _Program:
    """What has been declared so far while a spec is drawn."""

    draw: Callable
    lines: list[str]
    tags: set[str]
    exclude: frozenset[str]
    coef_hypers: list[str] = field(default_factory=list)
    clip_hypers: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    def expr(self, atoms: Sequence[Atom], depth: int) -> tuple[str, float]:
        """A random elementwise expression over ``atoms`` (all of one size): (text, magnitude bound)."""
        draw = self.draw
        if depth <= 0 or draw(st.integers(0, 2)) == 0:
            atom = draw(st.sampled_from(atoms))
            self.tags.update(atom.tags)
            self.used.add(atom.text)
            return atom.text, atom.mag
        op = draw(st.sampled_from(_OPS))
        a, ma = self.expr(atoms, depth - 1)
        if op in ("add", "sub", "mul", "max", "min", "div"):
            b, mb = self.expr(atoms, depth - 1)
            if op == "sub" and b == a:
                op = "add"
            text, mag = {
                "add": (f"({a} + {b})", ma + mb),
                "sub": (f"({a} - {b})", ma + mb),
                "mul": (f"({a} * {b})", ma * mb),
                "max": (f"Max({a}, {b})", max(ma, mb)),
                "min": (f"Min({a}, {b})", max(ma, mb)),
                "div": (f"({a} / (1 + ({b})**2))", ma),
            }[op]
        elif op == "coef":
            if self.coef_hypers and draw(st.booleans()):
                text, mag = f"({draw(st.sampled_from(self.coef_hypers))} * {a})", 1.5 * ma
            else:
                text, mag = f"({_num(draw, (0.5, -1.5, 2, 3, -0.25))} * {a})", 3 * ma
        elif op == "offset":
            if self.coef_hypers and draw(st.booleans()):
                text, mag = f"({a} - {draw(st.sampled_from(self.coef_hypers))})", ma + 1.5
            else:
                text, mag = f"({a} + {_num(draw, (1, -0.5, 2.5))})", ma + 2.5
        elif op in ("tanh", "sigmoid", "sigmoid_by_hand"):
            text = {"tanh": f"tanh({a})", "sigmoid": f"sigmoid({a})",
                    "sigmoid_by_hand": f"(1 / (1 + exp(-({a}))))"}[op]
            mag = 1.0
        elif op == "exp":
            form = draw(st.integers(0, 2))
            if form == 0 and ma <= 3:
                text, mag = f"exp({a})", math.exp(ma)
            elif form == 1:
                text, mag = f"exp(-({a})**2)", 1.0
            else:
                text, mag = f"exp(tanh({a}))", math.e
        elif op == "log":
            text = draw(st.sampled_from((f"log(1 + ({a})**2)", f"log(1 + Abs({a}))", f"log(2 + tanh({a}))")))
            mag = math.log(1 + ma * ma)
        elif op == "sqrt":
            if ma <= 3 and draw(st.booleans()):
                text, mag = f"sqrt(exp({a}))", math.exp(ma / 2)
            else:
                text, mag = f"sqrt(1 + ({a})**2)", 1 + ma
        elif op == "abs":
            text, mag = f"Abs({a})", ma
        elif op == "relu":
            text, mag = f"relu({a})", ma
        elif op == "pow":
            form = draw(st.integers(0, 3))
            if form == 0 and ma <= 5:
                text, mag = f"({a})**2", ma * ma
            elif form == 1 and ma <= 3:
                text, mag = f"({a})**3", ma ** 3
            elif form == 2:
                text, mag = f"(1 + ({a})**2)**-1", 1.0
            else:
                text, mag = f"(1 + Abs({a}))**{_num(draw, (-0.5, 1.5, -2))}", (1 + ma) ** 1.5
        elif op == "clip":
            if self.clip_hypers:
                y = draw(st.sampled_from(self.clip_hypers))
                text = draw(st.sampled_from((f"Min(Max({a}, -{y}), {y})", f"Max(Min({a}, {y}), -{y})")))
            else:
                c = _num(draw, (0.5, 1.0, 2.0))
                text = f"Min(Max({a}, -{c}), {c})"
            mag = ma
        else:  # pragma: no cover
            raise AssertionError(op)
        if mag > CAP:
            text, mag = f"tanh({text})", 1.0
        return text, mag

    def bounded(self, atoms: Sequence[Atom], depth: int, cap: float = 6.0) -> tuple[str, float]:
        text, mag = self.vector(atoms, depth)
        if mag > cap:
            text, mag = f"tanh({text})", 1.0
        return text, mag

    def vector(self, atoms: Sequence[Atom], depth: int) -> tuple[str, float]:
        """An expression that reads a batch row (not only params), unless the class param_only is drawn."""
        text, mag = self.expr(atoms, depth)
        if _PARAM_ONLY.fullmatch(_ATOM.sub(lambda m: "w" if m.group(0).startswith("w") else "@", text)):
            rows = [a for a in atoms if not a.text.startswith("w")]
            if "param_only" not in self.exclude or not rows:
                self.tags.add("param_only")
            else:
                atom = self.draw(st.sampled_from(rows))
                self.tags.update(atom.tags)
                self.used.add(atom.text)
                text, mag = f"({text} * {atom.text})", mag * atom.mag
        return text, mag


#: Python names of atoms in a drawn expression (params are w<k>), and an expression of params alone.
_ATOM = re.compile(r"\bcell\.updated\(s\d\)|\b[xswg][\d_]*\b")
_PARAM_ONLY = re.compile(r"[^@]*")

_OPS = ("add", "sub", "mul", "coef", "offset", "tanh", "sigmoid", "sigmoid_by_hand", "exp", "log", "sqrt", "abs",
        "relu", "max", "min", "div", "pow", "clip")


@st.composite
def specs(draw: Callable, exclude: frozenset[str] = frozenset()) -> FuzzSpec:
    """A random legal spec file (see the module docstring); ``exclude``: bug classes to leave out."""
    exclude = frozenset(exclude)
    unknown = exclude - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown bug classes {sorted(unknown)}; known: {CLASSES}")
    tags: set[str] = set()
    names = _Names(draw, collide="name_collision" not in exclude)
    lines = ["import math", "",
             "from cellgen.dsl import INPUT_SIZE, NUM_UNITS, Abs, Cell, Max, Min, exp, log, relu, sigmoid, sqrt, tanh",
             ""]
    prog = _Program(draw, lines, tags, exclude)
    cell_name = "fz"
    if names.collide and draw(st.booleans()):
        cell_name = draw(st.sampled_from(CELL_NAMES))
        names.collided = True
    lines.append(f"cell = Cell({cell_name!r}, doc='A random cell drawn by tests/fuzz_specs.py.')")

    # sizes: I, H and 0-2 extras (size key -> Python text in the spec)
    size_text = {"I": "INPUT_SIZE", "H": "NUM_UNITS"}
    extra: dict[str, int] = {}
    for k in range(draw(st.integers(0, 2))):
        name = names.fresh("size")
        size_text[f"E{k}"] = f"size{k}"
        extra[name] = EXTRA_SIZES[k]
        lines.append(f"size{k} = cell.size({name!r})")
    vector_sizes = [key for key in size_text if key != "I"]
    input_units = "input_units" not in exclude and draw(st.integers(0, 9)) == 0
    in_key = "H" if input_units else "I"
    in_name = names.fresh("input")
    lines.append(f"x = cell.input({in_name!r}, size={size_text[in_key]})")
    atoms: list[Atom] = [Atom("x", in_key, 4.0)]
    used_sizes = {in_key}

    # states: at most one delay state (updated to exactly the input)
    n_states = draw(st.integers(1, 3))
    states: list[tuple[str, str, str]] = []  # (python var, size key, kind)
    for k in range(n_states):
        kind = "delay" if k == 0 and draw(st.integers(0, 3)) == 0 else "rec"
        rare_input_sized = ["I"] * (draw(st.integers(0, 5)) == 0)
        key = in_key if kind == "delay" else draw(st.sampled_from(vector_sizes + rare_input_sized))
        name = names.fresh("state")
        var = f"s{k}"
        lines.append(f"{var} = cell.state({name!r}, size={size_text[key]})")
        states.append((var, key, kind))
        used_sizes.add(key)

    # params and hypers
    for k in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(vector_sizes))
        init = draw(st.sampled_from(("'uniform'", "0.5", "-1.0")))
        lines.append(f"w{k} = cell.param({names.fresh('param')!r}, size={size_text[key]}, init={init})")
        atoms.append(Atom(f"w{k}", key, 2.0))
        used_sizes.add(key)
    hyper: dict[str, float | None] = {}
    for k in range(draw(st.integers(0, 3))):
        name = names.fresh("hyper")
        if draw(st.booleans()):  # a clip
            default = draw(st.sampled_from((math.inf, 0.5, 2.0)))
            text = "math.inf" if default == math.inf else repr(default)
            lines.append(f"y{k} = cell.hyper({name!r}, {text})")
            prog.clip_hypers.append(f"y{k}")
            choice = draw(st.sampled_from(("default", "value", "none")))
            if choice == "value":
                hyper[name] = draw(st.sampled_from((0.3, 1.2)))
            elif choice == "none" and default == math.inf:
                hyper[name] = None
        else:  # a coefficient or an offset
            lines.append(f"y{k} = cell.hyper({name!r}, {draw(st.sampled_from((1.0, -0.5, 0.25)))!r})")
            prog.coef_hypers.append(f"y{k}")
            if draw(st.booleans()):
                hyper[name] = draw(st.sampled_from((0.7, -1.25)))

    # the step, in an order that needs no cycle: linears and updates interleaved, then the output
    delays = [var for var, _, kind in states if kind == "delay"]
    state_atoms = {var: Atom(var, key, 3.0, frozenset({"delay_read"} if kind == "delay" else ()))
                   for var, key, kind in states if kind != "delay" or "delay_read" not in exclude}
    updated: dict[str, Atom] = {}
    gates: list[Atom] = []
    pending = list(range(n_states))
    n_linears = draw(st.integers(1, 3))
    gate_sizes: set[str] = set()
    n_lin = 0
    linear_gates: list[list[Atom]] = []

    def candidates(context: str, own: str | None = None) -> list[Atom]:
        result = list(atoms) + list(gates)
        for var, atom in state_atoms.items():
            if context == "linear" or var == own:
                result.append(atom)
            elif "old_read" not in exclude:
                result.append(Atom(atom.text, atom.size, atom.mag, atom.tags | {"old_read"}))
        for atom in updated.values():
            if context == "linear":
                if "updated_in_linear" not in exclude:
                    result.append(Atom(atom.text, atom.size, atom.mag, frozenset({"updated_in_linear"})))
            else:
                result.append(atom)
        return result

    def by_size(cands: list[Atom]) -> dict[str, list[Atom]]:
        groups: dict[str, list[Atom]] = {}
        for atom in cands:
            groups.setdefault(atom.size, []).append(atom)
        return groups

    while pending or n_lin < n_linears:
        if n_lin < n_linears and (not pending or draw(st.booleans())):
            groups = by_size(candidates("linear"))
            if "param_only" in exclude:  # sizes with something besides params
                groups = {k: v for k, v in groups.items() if any(not a.text.startswith("w") for a in v)}
            operands = []
            for _ in range(draw(st.integers(1, 3))):
                key = draw(st.sampled_from(sorted(groups)))
                operands.append(prog.bounded(groups[key], draw(st.integers(0, 2)))[0])
            if delays and draw(st.booleans()):  # a delay state as a whole operand: hoisted, read late
                operands.insert(draw(st.integers(0, len(operands))), delays[0])
            unread = [g for g in gates if g.text not in prog.used]
            if unread and draw(st.booleans()):  # read a gate nothing reads yet
                operands.append(prog.bounded([draw(st.sampled_from(unread))], 0)[0])
            gkey = draw(st.sampled_from(vector_sizes))
            n_gates = draw(st.integers(1, 4))
            kernel = names.fresh("pname")
            bias = draw(st.sampled_from((None, "named")))
            bias = names.fresh("pname") if bias else None
            bias_init = draw(st.sampled_from((0.0, 1.0)))
            gate_names: list[str] | None = None
            if "int_gates" not in exclude and draw(st.integers(0, 3)) == 0:
                ident = dsl._identifier(kernel)
                derived = [ident] if n_gates == 1 else [f"{ident}_{g}" for g in range(n_gates)]
                if all(mangle(d) not in names.used for d in derived):
                    for d in derived:
                        names.take(d)
                    tags.add("int_gates")
                    gates_arg = str(n_gates)
                    gate_names = derived
            if gate_names is None:
                gate_names = [names.fresh("gate") for _ in range(n_gates)]
                gates_arg = "(" + "".join(f"{g!r}, " for g in gate_names) + ")"
            gvars = [f"g{n_lin}_{g}" for g in range(n_gates)]
            target = ", ".join(gvars)
            bias_args = f"bias={bias!r}, bias_init={bias_init!r}" if bias else "bias=None"
            lines.append(f"{target} = cell.linear([{', '.join(operands)}], gates={gates_arg}, kernel={kernel!r}, "
                         f"{bias_args}, size={size_text[gkey]})")
            gates.extend(Atom(v, gkey, 6.0) for v in gvars)
            linear_gates.append([Atom(v, gkey, 6.0) for v in gvars])
            gate_sizes.add(gkey)
            used_sizes.add(gkey)
            n_lin += 1
            continue
        k = pending.pop(draw(st.integers(0, len(pending) - 1)))
        var, key, kind = states[k]
        groups = by_size(candidates("update", own=var))
        same = groups.get(key, [])
        if kind == "delay":
            text, mag = "x", 4.0
        else:
            form = draw(st.integers(0, 5))
            others = [a for a in same if a.text != var and (a.text in state_atoms or a.text.startswith("cell.updated"))]
            if form == 0 and others:  # a copy of another state's old or new value
                atom = draw(st.sampled_from(others))
                tags.update(atom.tags)
                text, mag = atom.text, atom.mag
            elif form in (1, 2):
                text, mag = f"tanh({prog.vector(same, draw(st.integers(0, 3)))[0]})", 1.0
            elif form == 3:
                text, mag = f"sigmoid({prog.vector(same, draw(st.integers(0, 3)))[0]})", 1.0
            elif form == 4 and prog.clip_hypers:
                e, mag = prog.bounded(same, draw(st.integers(0, 3)))
                y = draw(st.sampled_from(prog.clip_hypers))
                text = f"Min(Max({e}, -{y}), {y})"
            else:  # a sigmoid interpolation between the old value and a candidate
                f_text = prog.expr(same, draw(st.integers(0, 2)))[0]
                cand = prog.expr(same, draw(st.integers(0, 2)))[0]
                text, mag = f"(sigmoid({f_text}) * {var} + (1 - sigmoid({f_text})) * tanh({cand}))", 3.0
        lines.append(f"cell.update({var}, {text})")
        updated[var] = Atom(f"cell.updated({var})", key, max(mag, 3.0))

    # the output: a new value, an old value or any expression, of any size; it reads every linear nothing
    # reads yet (but with the class dead_linear, sometimes not)
    dead = [lg[0] for lg in linear_gates if not any(g.text in prog.used for g in lg)]
    if dead and "dead_linear" not in exclude and draw(st.integers(0, 7)) == 0:
        tags.add("dead_linear")
        dead = []
    tail = ""
    if dead:
        key = dead[0].size
        others = [g for g in dead if g.size != key]
        dead = [g for g in dead if g.size == key]
        if others:
            kernel = names.fresh("pname")
            gname = names.fresh("gate")
            operands = ", ".join(f"tanh({g.text})" for g in others)
            lines.append(f"g{n_lin}_0 = cell.linear([{operands}], gates=({gname!r},), kernel={kernel!r}, bias=None, "
                         f"size={size_text[key]})")
            dead.append(Atom(f"g{n_lin}_0", key, 6.0))
        tail = "".join(f" + 0.5 * tanh({g.text})" for g in dead)
    groups = by_size(candidates("output"))
    if "param_only" in exclude:
        groups = {k: v for k, v in groups.items() if any(not a.text.startswith("w") for a in v)}
    form = draw(st.integers(0, 2))
    if dead:
        out_text = prog.vector(groups[key], draw(st.integers(0, 3)))[0] + tail
    elif form == 0:
        atom = draw(st.sampled_from(list(updated.values())))
        out_text = atom.text
    else:
        key = draw(st.sampled_from(sorted(groups)))
        out_text = prog.vector(groups[key], draw(st.integers(0, 3)))[0]
    lines.append(f"cell.output({out_text})")
    gate_sizes.update(g.size for g in gates)

    # every size the cell uses must be readable off a parameter's shape
    readable = gate_sizes | {a.size for a in atoms if a.text.startswith("w")} | {"I"}
    if "H" not in used_sizes and "H" not in readable:
        if "no_num_units" in exclude:
            used_sizes.add("H")
        else:
            tags.add("no_num_units")
    for key in sorted((used_sizes | set(size_text) - {"I", "H"}) - readable):
        lines.append(f"cell.param({names.fresh('param')!r}, size={size_text[key]})  # makes the size readable")
    if input_units:
        tags.add("input_units")
    if names.collided:
        tags.add("name_collision")
    return FuzzSpec("\n".join(lines) + "\n", frozenset(tags), extra,
                    NUM_UNITS if input_units else INPUT_SIZE, NUM_UNITS, hyper, draw(st.integers(0, 2**16)))


# ------------------------------------------------------------------------------------------------
# the evaluator: the spec's equations, walked here
# ------------------------------------------------------------------------------------------------


def load_cell(path: str | Path) -> dsl.Cell:
    """Run a spec file and return the one ``Cell`` it builds (the DSL's record, not cellgen's CellSpec)."""
    namespace = runpy.run_path(str(path), run_name="fuzz_spec")
    cells = {id(v): v for v in namespace.values() if isinstance(v, dsl.Cell)}
    assert len(cells) == 1, f"{path}: expected one Cell, found {len(cells)}"
    return next(iter(cells.values()))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


_FUNCTIONS: dict[type, Callable[..., Any]] = {
    sympy.tanh: np.tanh, sympy.exp: np.exp, sympy.log: np.log, dsl.sigmoid: _sigmoid, sympy.Abs: np.abs,
}


class Evaluator:
    """The equations of a ``Cell``, evaluated by walking its SymPy trees in float64 NumPy."""

    def __init__(self, cell: dsl.Cell, input_size: int, num_units: int, sizes: Mapping[str, int]) -> None:
        self.cell = cell
        self.dims: dict[sympy.Expr, int] = {dsl.INPUT_SIZE: input_size, dsl.NUM_UNITS: num_units}
        for name, value in sizes.items():
            self.dims[cell.sizes[name]] = value
        self.vectors = {k: d for k, d in cell.vectors.items() if "#" not in k}
        # cell.updated(s): a symbol of its own (cellgen.dsl keeps them apart from the declared names)
        self.vectors.update({str(d.symbol): d for d in getattr(cell, "new_values", {}).values()})
        self.states = [k for k, d in self.vectors.items() if d.kind == "state"]
        self.input = next(k for k, d in self.vectors.items() if d.kind == "input")
        self.updates = {str(u.state): u.expr for u in cell.updates}
        self.owner = {str(g): (lin, k) for lin in cell.linears for k, g in enumerate(lin.gates)}

    def dim(self, size: sympy.Expr) -> int:
        return self.dims[size]

    def symbol_dim(self, name: str) -> int:
        decl = self.vectors[name]
        if decl.kind == "new":
            return self.dim(self.vectors[decl.state].size)
        return self.dim(decl.size)

    def expr_dim(self, expr: sympy.Expr) -> int:
        dims = {self.symbol_dim(str(s)) for s in expr.free_symbols if str(s) in self.vectors}
        assert len(dims) == 1, (expr, dims)
        return dims.pop()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and TF shape, from the declarations."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, decl in self.vectors.items():
            if decl.kind == "param":
                shapes[name] = (self.dim(decl.size),)
        for lin in self.cell.linears:
            cols = len(lin.gates) * self.dim(lin.gate_size)
            shapes[lin.kernel] = (sum(self.expr_dim(o) for o in lin.operands), cols)
            if lin.bias is not None:
                shapes[lin.bias] = (cols,)
        return shapes

    def state_dims(self) -> list[int]:
        return [self.dim(self.vectors[s].size) for s in self.states]

    def step(self, params: Mapping[str, np.ndarray], x: np.ndarray, state: Mapping[str, np.ndarray],
             hyper: Mapping[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step for a batch: (output, new states)."""
        memo: dict[str, Any] = {}

        def value(name: str) -> Any:
            if name in memo:
                return memo[name]
            if name in self.cell.hypers:
                memo[name] = hyper[name]
                return memo[name]
            decl = self.vectors[name]
            if decl.kind == "input":
                memo[name] = x
            elif decl.kind == "state":
                memo[name] = state[name]
            elif decl.kind == "param":
                memo[name] = params[name][None, :]
            elif decl.kind == "new":
                memo[name] = ev(self.updates[decl.state])
            elif decl.kind == "gate":
                lin, _ = self.owner[name]
                operands = [np.broadcast_to(ev(o), (x.shape[0], self.expr_dim(o))) for o in lin.operands]
                y = np.concatenate(operands, axis=1) @ params[lin.kernel]
                if lin.bias is not None:
                    y = y + params[lin.bias]
                for g, part in zip(lin.gates, np.split(y, len(lin.gates), axis=1), strict=True):
                    memo[str(g)] = part
            else:  # pragma: no cover
                raise AssertionError(decl.kind)
            return memo[name]

        def ev(expr: sympy.Expr) -> Any:
            if isinstance(expr, sympy.Symbol):
                return value(str(expr))
            if isinstance(expr, sympy.Number):
                return float(expr)
            args = [ev(a) for a in expr.args]
            if isinstance(expr, sympy.Add):
                total = args[0]
                for a in args[1:]:
                    total = total + a
                return total
            if isinstance(expr, sympy.Mul):
                prod = args[0]
                for a in args[1:]:
                    prod = prod * a
                return prod
            if isinstance(expr, sympy.Pow):
                return np.power(args[0], args[1])
            if isinstance(expr, sympy.Max):
                return _reduce(np.maximum, args)
            if isinstance(expr, sympy.Min):
                return _reduce(np.minimum, args)
            for fn, impl in _FUNCTIONS.items():
                if isinstance(expr, fn):
                    return impl(args[0])
            raise NotImplementedError(f"evaluator: {type(expr).__name__} in {expr}")

        out = np.broadcast_to(ev(self.cell.outputs[0][0]), (x.shape[0], self.expr_dim(self.cell.outputs[0][0])))
        new = {s: np.broadcast_to(ev(self.updates[s]), state[s].shape) for s in self.states}
        return np.array(out), new

    def dynamic_rnn(self, params: Mapping[str, np.ndarray], inputs: np.ndarray, lengths: np.ndarray,
                    initial: Sequence[np.ndarray], hyper: Mapping[str, float | None]
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """TF 1.x dynamic_rnn: zero outputs and frozen states past each row's length (batch-major)."""
        values = {k: (math.inf if v is None else float(v)) for k, v in self.hyper_defaults().items()}
        values.update({k: (math.inf if v is None else float(v)) for k, v in hyper.items()})
        p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        state = {s: np.array(v, dtype=np.float64) for s, v in zip(self.states, initial, strict=True)}
        batch, steps, _ = inputs.shape
        outputs: np.ndarray | None = None
        with np.errstate(over="ignore"):
            for t in range(steps):
                out, new = self.step(p, inputs[:, t].astype(np.float64), state, values)
                if outputs is None:
                    outputs = np.zeros((batch, steps, out.shape[1]))
                live = t < lengths
                outputs[live, t] = out[live]
                for s in self.states:
                    state[s] = np.where(live[:, None], new[s], state[s])
        if outputs is None:
            outputs = np.zeros((batch, steps, self.expr_dim(self.cell.outputs[0][0])))
        return outputs, [state[s] for s in self.states]

    def hyper_defaults(self) -> dict[str, float]:
        return {k: h.default for k, h in self.cell.hypers.items()}


def _reduce(fn: Callable[[Any, Any], Any], args: list[Any]) -> Any:
    acc = args[0]
    for a in args[1:]:
        acc = fn(acc, a)
    return acc


# ------------------------------------------------------------------------------------------------
# build, run, compare
# ------------------------------------------------------------------------------------------------

TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
_modules = itertools.count()


def import_generated(target: Path) -> ModuleType:
    """Import a generated module from its file under a name no other spec uses."""
    name = f"cellgen_fuzz_{next(_modules)}_{target.stem}"
    module_spec = importlib.util.spec_from_file_location(name, target)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def assert_close(what: str, got: np.ndarray, want: np.ndarray, dtype: np.dtype) -> None:
    """|got - want| <= tol * (|want| + scale) elementwise; scale: the array's largest |value|, at least 1."""
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    tol = TOL[np.dtype(dtype)]
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= tol * (np.abs(want) + scale))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values differ (tolerance {tol:g}, scale "
                             f"{scale:.3g}); first at {idx}: got {got[idx]!r}, expected {want[idx]!r}; max error "
                             f"{float(np.nanmax(np.where(np.isnan(err), np.inf, err))):.3g}")


def random_inputs(ev: Evaluator, fz: FuzzSpec, dtype: np.dtype, batch: int = BATCH, steps: int = STEPS
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    """Parameters (kernels scaled by 1/sqrt(rows)), inputs, ragged lengths with 0 and T, initial states."""
    rng = np.random.default_rng(fz.seed)
    params = {}
    for name, shape in sorted(ev.param_shapes().items()):
        scale = 1.0 / math.sqrt(shape[0]) if len(shape) == 2 else 0.5
        params[name] = (rng.standard_normal(shape) * scale).astype(dtype)
    inputs = rng.standard_normal((batch, steps, fz.input_size)).astype(dtype)
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0], lengths[-1] = steps, 0
    initial = [rng.standard_normal((batch, n)).astype(dtype) for n in ev.state_dims()]
    return params, inputs, lengths, initial


def build_spec(text: str, folder: Path) -> tuple[Path, ModuleType]:
    """Write ``text`` as a spec file in ``folder``, build it with cellgen into ``folder/gen`` and import it."""
    from cellgen.build import build

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.py"
    path.write_text(text)
    (result,) = build([path], out_dir=folder / "gen")
    return path, import_generated(result.target)


def check_spec(fz: FuzzSpec, folder: Path, dtypes: Sequence[Any] = (np.float64, np.float32),
               backends: Sequence[str] = ("cpu", "reference")) -> None:
    """Build, import and run one spec; every backend and dtype must match the evaluator (and each other)."""
    path, module = build_spec(fz.text, folder)
    ev = Evaluator(load_cell(path), fz.input_size, fz.num_units, fz.sizes)
    assert tuple(module.STATE) == tuple(ev.states), f"STATE {module.STATE}, expected {tuple(ev.states)}"
    want_shapes = ev.param_shapes()
    got_shapes = module.param_shapes(fz.input_size, fz.num_units, **fz.sizes)
    assert dict(got_shapes) == want_shapes, f"param_shapes {got_shapes}, expected {want_shapes}"
    for dtype in map(np.dtype, dtypes):
        params, inputs, lengths, initial = random_inputs(ev, fz, dtype)
        want_out, want_states = ev.dynamic_rnn(params, inputs, lengths, initial, fz.hyper)
        assert np.all(np.isfinite(want_out)), "the evaluator's outputs are not finite (a strategy bug)"
        for backend in backends:
            out, final = module.dynamic_rnn(params, inputs, sequence_length=lengths,
                                            initial_state=module.State(*initial), backend=backend, **fz.hyper)
            label = f"{backend} {dtype.name}"
            assert_close(f"{label} outputs", out, want_out, dtype)
            assert not np.any(np.asarray(out)[lengths == 0]), f"{label}: outputs of a row of length 0 are not 0"
            for s, got, want in zip(ev.states, final, want_states, strict=True):
                assert_close(f"{label} final state {s!r}", got, want, dtype)


def from_text(text: str, *, sizes: Mapping[str, int] | None = None, hyper: Mapping[str, float | None] | None = None,
              input_size: int = INPUT_SIZE, num_units: int = NUM_UNITS, seed: int = 0) -> FuzzSpec:
    """A hand-written (or shrunk) spec text as a FuzzSpec, for :func:`check_spec`."""
    return FuzzSpec(text, frozenset(), dict(sizes or {}), input_size, num_units, dict(hyper or {}), seed)


def degenerate(path: Path) -> bool:
    """True when SymPy simplified an operand or the output into a scalar (h - h): not a legal spec."""
    cell = load_cell(path)
    vectors = {k for k in cell.vectors if "#" not in k}

    def is_vector(e: sympy.Expr) -> bool:
        return any(str(s) in vectors for s in e.free_symbols)

    exprs = [o for lin in cell.linears for o in lin.operands] + [cell.outputs[0][0]] + [u.expr for u in cell.updates]
    if not all(is_vector(e) for e in exprs):
        return True
    # the same after cell.updated(s) is resolved: s0 - updated(s1) with s1 <- s0 is the scalar 0
    from cellgen.frontend.spec import SpecError, load_spec

    try:
        load_spec(path)
    except SpecError as err:
        return "is a scalar" in err.message or "must be a vector" in err.message
    return False


__all__ = ["CLASSES", "Evaluator", "FuzzSpec", "assert_close", "build_spec", "check_spec", "degenerate", "from_text",
           "load_cell", "specs"]
