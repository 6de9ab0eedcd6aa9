"""Stage 4a (expressions -> names): what the generated code calls its temporaries.

A temporary is named after what it computes, in the spec's words:

* a state's new value ``new_<state>``, the output's ``output``, a GEMM operand ``operand<stage>``;
* an activation of gates ``sig_<gates>``, ``tanh_<gates>``, ``exp_``, ``log_``, ``abs_``, ``max_``,
  ``min_`` (``sig_f``: ``sigmoid(f + forget_bias + w_f_diag * c)``), any other expression of
  gates ``g_<gates>``; an activation of one named value ``tanh_new_c``; anything else ``tmp``;
* the argument of a NaN-propagating max/min (:func:`cellgen.codegen.printing.atomic_minmax`)
  after the value it feeds: ``new_c_max`` (a Max), ``new_c_min`` (a Min), ``new_c_arg``.

Every temporary's name is in one of these families (:data:`FAMILIES`), and made unique with
``_2``, ``_3``... against every other temporary of the plan and every identifier the templates'
code holds (``b``, ``j``, ``t``, ``out``, ``lengths``, ``np``, whatever a template adds). The names
the contexts make (``pre_t``, ``x_prev``, ``rec0``, ``opnd1``, ``_acc0``, ``ring``...) are in no
family, and spec names live under ``s_``, ``sn_``, ``p_``, ``hy_``, ``n_`` (:mod:`cellgen.ir.plan`),
which no family starts with: a temporary never shadows another name of the generated code
(``tests/test_lint.py`` checks the generated modules).

Naming never changes an expression: the printers keep the SymPy trees (and the generator's
internal symbols ``t0``, ``_mx0``, whose names decide the order SymPy prints the terms of a
sum in) and print a named subexpression or temporary by its name (``names`` of
:class:`cellgen.codegen.printing.NumbaPrinter`). The arithmetic is the unnamed code's, operation
for operation.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sympy

from cellgen import resources
from cellgen.frontend.dsl import sigmoid

#: The prefix of an activation's temporary, by function.
FUNCTION_PREFIXES: dict[type, str] = {
    sigmoid: "sig", sympy.tanh: "tanh", sympy.exp: "exp", sympy.log: "log", sympy.Abs: "abs",
    sympy.Max: "max", sympy.Min: "min",
}
#: Functions whose application to gates gets a temporary of its own even when used once.
ACTIVATIONS = (sigmoid, sympy.tanh, sympy.exp, sympy.log, sympy.Abs)
#: At most this many gate names in one temporary's name.
MAX_WORDS = 3
#: Every temporary's name matches this.
FAMILIES = re.compile(r"(g|sig|tanh|exp|log|abs|max|min|new)_\w+|(output|operand\d+|tmp)(_(max|min|arg|\d+))*")


@functools.cache
def template_names() -> frozenset[str]:
    """Every identifier the templates hold (cellgen's and every registered backend's own folder):
    names a temporary never takes."""
    words: set[str] = set()
    folders = resources.template_folders(resources.templates_dir())
    for path in sorted(p for folder in folders for p in folder.rglob("*.j2")):
        text = path.read_text(encoding="utf-8")
        # the code's identifiers: not the words of its comments and docstrings
        text = re.sub(r"\{([{%#])[\s\S]*?[}%#]\}", " ", text)  # Jinja: what it prints is named elsewhere
        text = re.sub(r'"""[\s\S]*?"""|#.*', " ", text)
        words.update(re.findall(r"[^\W\d]\w*", text))
    return frozenset(words)


class Namer:
    """Hands out unique names: ``base``, else ``base_2``, ``base_3``..."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self.taken = set(template_names()) | set(taken)

    def fresh(self, base: str) -> str:
        name = base
        for k in itertools.count(2):
            if name not in self.taken:
                break
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


#: What an atom of an expression is, in the spec's words: ("gate", name), ("word", name) or None.
AtomWord = Callable[[sympy.Expr], "tuple[str, str] | None"]


@dataclass
class Describer:
    """Names expressions by the gates they read directly (not through a named part).

    ``atom_word`` tells what an atom is; ``gate_order`` orders gate names (spec order);
    ``names`` are the names given so far (a named part is one word, its gates hidden);
    ``transparent`` maps symbols whose expressions count as written out (max/min arguments).
    """

    atom_word: AtomWord
    gate_order: dict[str, int]
    names: dict[sympy.Expr, str]
    transparent: dict[sympy.Expr, sympy.Expr]

    def words(self, expr: sympy.Expr, top: bool = True) -> tuple[list[str], list[str]]:
        """(gates, other words) ``expr`` reads directly, each once, gates in spec order."""
        gates: dict[str, None] = {}
        others: dict[str, None] = {}

        def visit(e: sympy.Expr, top: bool) -> None:
            if not top and e in self.names:
                others[self.names[e]] = None
                return
            if e in self.transparent:
                visit(self.transparent[e], False)
                return
            found = self.atom_word(e)
            if found is not None:
                (gates if found[0] == "gate" else others)[found[1]] = None
                return
            if isinstance(e, sympy.Indexed) or e.is_Atom:
                return
            for a in e.args:
                visit(a, False)

        visit(expr, top)
        return sorted(gates, key=self.gate_order.__getitem__), list(others)

    def base(self, expr: sympy.Expr) -> str:
        """``sig_f``, ``g_r_z``, ``tanh_new_c`` or ``tmp``."""
        gates, others = self.words(expr)
        prefix = FUNCTION_PREFIXES.get(type(expr))
        if gates:
            return f"{prefix or 'g'}_{_join(gates)}"
        if prefix and len(others) == 1:
            return f"{prefix}_{others[0]}"
        return "tmp"

    def name_activations(self, expr: sympy.Expr, namer: Namer, whole: bool = False) -> list[sympy.Expr]:
        """Name every activation of gates inside ``expr`` (``whole``: ``expr`` itself too) that has
        no name yet, inner ones first; returns them in that order (each a temporary of its own)."""
        found: list[sympy.Expr] = []

        def visit(e: sympy.Expr, top: bool) -> None:
            if e.is_Atom or isinstance(e, sympy.Indexed) or (not top and e in self.names):
                return
            for a in e.args:
                visit(a, False)
            if (whole or not top) and e not in self.names and isinstance(e, ACTIVATIONS) and self.words(e)[0]:
                self.names[e] = namer.fresh(self.base(e))
                found.append(e)

        visit(expr, True)
        return found


def _join(words: list[str]) -> str:
    return "_".join(words[:MAX_WORDS]) + ("_etc" if len(words) > MAX_WORDS else "")


# -- an epilogue loop's statements -------------------------------------------------------------
@dataclass(frozen=True)
class LoopProgram:
    """One loop's statements, named: ``assignments`` (name, expression) run before any store,
    then ``stores`` (target, value: an expression or a name). ``names`` is what the printer
    prints by name: every temporary symbol and every named subexpression."""

    assignments: tuple[tuple[str, sympy.Expr], ...]
    stores: tuple[tuple[sympy.Indexed, sympy.Expr | str], ...]
    names: dict[sympy.Expr, str]


def name_loop(temps: list[tuple[sympy.Symbol, sympy.Expr]], values: list[sympy.Expr],
              targets: list[sympy.Indexed], minmax: set[sympy.Symbol], describer: Describer,
              target_base: Callable[[sympy.Indexed], str], namer: Namer) -> LoopProgram:
    """Name one loop's temporaries (``temps``: assignments in order, after :func:`atomic_minmax`,
    ``minmax`` the symbols it added), its activations of gates and the values it must read
    before a store (a Loop is a parallel assignment: :class:`cellgen.ir.plan.Loop`)."""
    names = describer.names
    exprs = dict(temps)
    owner: dict[sympy.Symbol, int] = {}  # a temporary that IS a store's value: named after the target
    for k, v in enumerate(values):
        if v in exprs and v not in owner:
            owner[v] = k
    for _, expr in temps:
        describer.name_activations(expr, namer)
    for v in values:
        describer.name_activations(v, namer, whole=False)
    for sym, expr in temps:  # the CSE's temporaries, in order
        if sym not in minmax:
            names[sym] = namer.fresh(target_base(targets[owner[sym]]) if sym in owner else describer.base(expr))
    # a max/min argument after the value it feeds (named already: it comes later); an argument
    # of an argument after that value too: new_c_arg -> new_c_max -> new_c
    root: dict[sympy.Symbol, str] = {}
    for sym, expr in reversed(temps):
        if sym not in minmax:
            continue
        if sym in owner:
            base = target_base(targets[owner[sym]])
        elif isinstance(expr, ACTIVATIONS) and describer.words(expr)[0]:
            base = describer.base(expr)
        else:
            feeds = next((root.get(s, names[s]) for s, e in temps if s in names and sym in e.free_symbols), None)
            if feeds is None:  # a store's value
                feeds = next(names.get(v) or target_base(t) for t, v in zip(targets, values, strict=True)
                             if sym in v.free_symbols)
            root[sym] = feeds
            role = "max" if isinstance(expr, sympy.Max) else "min" if isinstance(expr, sympy.Min) else "arg"
            base = f"{feeds}_{role}"
        names[sym] = namer.fresh(base)

    assignments: list[tuple[str, sympy.Expr]] = []
    emitted: set[sympy.Expr] = set()

    def emit_parts(expr: sympy.Expr) -> None:
        """The named activations inside ``expr`` first, inner ones first, each once."""
        for e in _postorder(expr):
            if e in names and not isinstance(e, sympy.Symbol) and e not in emitted:
                emitted.add(e)
                assignments.append((names[e], e))

    for sym, expr in temps:
        emit_parts(expr)
        assignments.append((names[sym], expr))
    stores: list[tuple[sympy.Indexed, sympy.Expr | str]] = []
    written: set[str] = set()
    for target, v in zip(targets, values, strict=True):
        emit_parts(v)
        if v in names or not {str(i.base) for i in v.atoms(sympy.Indexed)} & written:
            stores.append((target, v))  # printed at its store: it reads nothing stored before it
        else:  # it reads an array an earlier store of the loop writes: read it before any store
            name = namer.fresh(target_base(target))
            assignments.append((name, v))
            stores.append((target, name))
        written.add(str(target.base))
    return LoopProgram(tuple(assignments), tuple(stores), dict(names))


def _postorder(expr: sympy.Expr):
    if not (expr.is_Atom or isinstance(expr, sympy.Indexed)):
        for a in expr.args:
            yield from _postorder(a)
    yield expr
