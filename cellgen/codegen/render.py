"""Stage 4b (FusedPlan -> module text): the Jinja environment and the template context.

Everything a template receives is a string, an int, a bool or a list/dict of
those: expressions are printed here by :mod:`cellgen.codegen.printing`, structure lives
in ``templates/``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any

import jinja2
import sympy

from cellgen import backends, resources
from cellgen.version import __version__
from cellgen.frontend.dsl import INPUT_SIZE, NUM_UNITS
from cellgen.ir.plan import (
    FusedPlan,
    size_name,
)
from cellgen.frontend.spec import SpecError
from cellgen.codegen.format import LINE_LENGTH
from cellgen.codegen.printing import (
    display_index,
    print_index,
)

TEMPLATES = resources.templates_dir()  # the installed package data or the checkout's templates/


def environment() -> jinja2.Environment:
    """The templates' environment: one per set of template folders (the registered backends'), kept
    for the process, so a build compiles each template once (Jinja reloads a template whose file changed)."""
    return _environment(tuple(str(f) for f in resources.template_folders(TEMPLATES)))


@functools.lru_cache(maxsize=8)
def _environment(folders: tuple[str, ...]) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(folders)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.filters["pytuple"] = py_tuple
    env.filters["fit"] = fit_line
    return env


def py_tuple(items) -> str:
    """Printed items as a Python tuple: ``()``, ``("h",)``, ``("c", "h")`` (the ``pytuple`` filter)."""
    items = [str(i) for i in items]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def templates_digest() -> str:
    """sha256 over every template file: part of each generated module's key."""
    h = hashlib.sha256()
    for folder in resources.template_folders(TEMPLATES):
        for path in sorted(folder.rglob("*.j2")):
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()






def _take_sizes(names: list[str], given: tuple[str, ...], used: set[str]) -> list[str]:
    """The lines binding the kernel variables of a function's sizes that ``used`` holds: the ``given``
    positional ones (``n_num_units = num_units``) and the keyword ``names``, always checked
    (``n_num_proj = _rt.take_sizes(sizes, ("num_proj",), SIZES)[0]``; ``_`` for one not used)."""
    lines = [f"{size_name(n)} = {n}" for n in given if n in used]
    call = f"_rt.take_sizes(sizes, {py_tuple(repr(n) for n in names)}, SIZES)"
    if len(names) == 1 and names[0] in used:
        lines.append(f"{size_name(names[0])} = {call}[0]")
    elif any(n in used for n in names):
        lines.append(f"{', '.join(size_name(n) if n in used else '_' for n in names)} = {call}")
    else:
        lines.append(call)
    return lines


def _used_sizes(exprs) -> set[str]:
    """The spec names of the sizes ``exprs`` use."""
    return {str(s) for e in exprs for s in sympy.sympify(e).free_symbols}


def _needed(exprs, spec) -> list[str]:
    symbols = set().union(*(sympy.sympify(e).free_symbols for e in exprs)) if exprs else set()
    return [str(s) for s in (INPUT_SIZE, *spec.sizes) if s in symbols]


def _sizes_from_dict(plan: FusedPlan) -> str:
    """``n_num_units = sizes['num_units']; ...``: the kernel variable, from a call's sizes, of every size
    the plan's kernels use (loops, GEMMs, operand buffers, recurrent states, the output): a backend's driver."""
    exprs: list[Any] = [plan.output_size, *(plan.spec.state(n).size for n in plan.recurrent_states)]
    for e in plan.epilogues:
        for loop in e.loops:
            exprs += [loop.domain, *(x for _, x in loop.temps)]
            exprs += [x for st in loop.stores for x in (st.target, st.value, st.masked) if x is not None]
    exprs += [x for g in plan.gemms for x in (g.rows, g.width, *(o.size for o in g.operands))]
    return "; ".join(_size_lines(plan.spec, _used_sizes(exprs)))


def _size_lines(spec, used: set[str] | None = None) -> list[str]:
    """``n_input_size = sizes["input_size"]``...: the kernel variable of every size (of those ``used``
    holds) from a call's sizes, a line each."""
    return [f"{size_name(n)} = sizes[{n!r}]" for n in map(str, spec.all_sizes) if used is None or n in used]


def _params(plan: FusedPlan) -> list[dict[str, Any]]:
    spec, out = plan.spec, []
    for lin in spec.linears:
        out.append({"name": lin.kernel, "shape": [print_index(lin.rows), print_index(lin.columns)],
                    "init": repr("glorot_uniform")})
        if lin.bias is not None:
            out.append({"name": lin.bias, "shape": [print_index(lin.columns)], "init": repr(lin.bias_init)})
    for p in spec.params:
        out.append({"name": p.name, "shape": [print_index(p.size)], "init": repr(p.init)})
    return out


def _size_rules(plan: FusedPlan) -> list[dict[str, Any]]:
    """For num_units and each extra size: where a call reads it off, in order.

    A size comes from a parameter dimension that determines it (given the sizes before it),
    else from the inputs' width (``cell.input(size=num_units)``); a size no vector uses is 0.
    Every other relation (the inputs' width, each parameter's and state's shape) is then
    checked against these sizes at call time.
    """
    spec = plan.spec
    known = {INPUT_SIZE}
    rules = []
    dims = [(p["name"], k, lin_dim) for p, lin_dim_list in _param_dims(plan) for k, lin_dim in enumerate(lin_dim_list)]
    dims.append((None, 2, spec.input.size))  # the inputs [T, B, width]: last, so parameters are checked first
    used = set().union(*(sympy.sympify(v.size).free_symbols for v in (spec.input, *spec.states, *spec.params)),
                       *(lin.rows.free_symbols | lin.columns.free_symbols for lin in spec.linears))
    d = sympy.Symbol("d")
    for size in (NUM_UNITS, *spec.sizes):
        if size not in used:
            rules.append({"size": str(size), "value": "0"})
            known.add(size)
            continue
        for name, k, dim in dims:
            if size in dim.free_symbols and dim.free_symbols - {size} <= known:
                solution = sympy.solve(sympy.Eq(d, dim), size)
                if len(solution) == 1:
                    names = {s: f"sizes[{str(s)!r}]" for s in known}
                    if name is None:  # the inputs' width
                        value = _int_expr(solution[0], names | {d: "input_size"})
                    else:
                        value = (f"_rt.size_from(params, {name!r}, {k}, "
                                 f"lambda d: {_int_expr(solution[0], names | {d: 'd'})}, sizes)")
                    rules.append({"size": str(size), "value": value})
                    known.add(size)
                    break
        else:
            where = next((v.line for v in (spec.input, *spec.states, *spec.params) if size in v.size.free_symbols),
                         spec.output_line)
            raise SpecError(spec.path, where, f"size {size}",
                            "no parameter and not the input determine this size; use it in a linear or a param")
    return rules


def _int_expr(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    num, den = sympy.fraction(sympy.together(expr))
    text = print_index(num, names)
    if den == 1:
        return text
    return f"{text if num.is_Atom else f'({text})'} // {print_index(den, names)}"


def _param_dims(plan: FusedPlan):
    spec = plan.spec
    for lin in spec.linears:
        yield {"name": lin.kernel}, [lin.rows, lin.columns]
        if lin.bias is not None:
            yield {"name": lin.bias}, [lin.columns]
    for p in spec.params:
        yield {"name": p.name}, [p.size]














def _state_names(spec) -> tuple[str, ...]:
    return tuple(s.name for s in spec.states)


def _slice(start: sympy.Expr, size: sympy.Expr) -> str:
    """``start:start + size`` as a slice, its end one simplified index (``:n_input_size``,
    ``n_input_size:n_input_size + n_num_proj``, ``4*n_num_units:8*n_num_units``)."""
    start = sympy.sympify(start)
    return f"{'' if start == 0 else print_index(start)}:{print_index(start + size)}"


def _blocks(blocks) -> list[dict[str, str]]:
    return [{"kernel": b.kernel, "rows": _slice(b.row_start, b.rows), "dest": f"{_slice(b.dest_row, b.rows)}, "
             f"{_slice(b.dest_col, b.width)}"} for b in blocks]


def _unpack_sizes(plan: FusedPlan) -> set[str]:
    """The sizes ``_unpack`` uses: every block's rows and destination."""
    return _used_sizes([e for g in (plan.hoisted, *plan.gemms) if g is not None for b in g.blocks
                        for e in (b.row_start, b.rows, b.dest_row, b.dest_col, b.width)])


def _pack_sizes(plan: FusedPlan) -> set[str]:
    """The sizes ``_pack`` uses: the fused weights' shapes and blocks."""
    exprs = []
    for g in (plan.hoisted, *plan.gemms):
        if g is None:
            continue
        if _whole_block(g.blocks, g.rows, g.width):  # a view: the rows of the parameter
            exprs += [g.blocks[0].row_start, g.blocks[0].rows]
        else:
            exprs += [g.rows, g.width] + [e for b in g.blocks for e in (b.row_start, b.rows, b.dest_row, b.dest_col,
                                                                        b.width)]
    if plan.hoisted is not None:
        exprs += [plan.hoisted.width] + [e for b in plan.hoisted.biases for e in (b.dest_col, b.width)]
    return _used_sizes(exprs)


def _whole_block(blocks, rows: sympy.Expr, width: sympy.Expr) -> bool:
    """One block that IS the fused weight: ``_pack`` returns a view of the parameter's rows
    (the backends copy it once into their own layout) instead of zeroing and adding."""
    if len(blocks) != 1:
        return False
    b = blocks[0]
    return b.dest_row == 0 and b.dest_col == 0 and sympy.simplify(b.rows - rows) == 0 and \
        sympy.simplify(b.width - width) == 0


def _docstring_text(text: str) -> str:
    """``text`` escaped for a ``\"\"\"`` docstring: quotes, backslashes and unprintable characters."""
    return "".join("\\" + ch if ch in '\\"' else ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _float_literal(value: float) -> str:
    """A float as Python source the module can run (``math`` is imported there): inf and nan too."""
    if math.isnan(value):
        return "math.nan"
    if math.isinf(value):
        return "math.inf" if value > 0 else "-math.inf"
    return repr(value)


#: A line that must hold a spec's path (the header, ``SPEC_PATH``) may pass the generated code's line
#: length (:data:`cellgen.codegen.format.LINE_LENGTH`) for a long path, and then says so.
LONG_LINE = "  # noqa: E501"


def fit_line(line: str) -> str:
    """``line``, marked ``noqa: E501`` when it is longer than the generated code's line length."""
    return line + LONG_LINE if len(line) > LINE_LENGTH else line


def context(plan: FusedPlan, spec_path: str, key: str) -> dict[str, Any]:
    """Everything ``templates/module.py.j2`` needs, as plain strings and ints."""
    spec = plan.spec
    for b in backends.REGISTRY.values():
        if plan.time_loop.direction.value not in b.directions:
            raise ValueError(f"backend {b.name} renders {' and '.join(b.directions)} time loops, "
                             f"not {plan.time_loop.direction.value} ones")
    hoisted = None
    if plan.hoisted is not None:
        h = plan.hoisted
        hoisted = {"rows": print_index(h.rows), "width": print_index(h.width), "blocks": _blocks(h.blocks),
                   "whole": _whole_block(h.blocks, h.rows, h.width),
                   "biases": [{"bias": b.bias, "dest": _slice(b.dest_col, b.width)} for b in h.biases],
                   "delayed": h.delayed}
    gemms = [{"rows": print_index(g.rows), "width": print_index(g.width), "blocks": _blocks(g.blocks),
              "whole": _whole_block(g.blocks, g.rows, g.width)} for g in plan.gemms]
    params = _params(plan)
    return {
        "version": __version__, "spec_path": spec_path, "key": key, "name": spec.name,
        "summary": _docstring_text((spec.doc.strip().splitlines() or [spec.name])[0].rstrip()),
        "states": [{"name": s.name, "size": print_index(s.size), "delay": s.name in plan.delay_states,
                    "recurrent": s.name not in plan.delay_states}
                   for s in spec.states],
        "sizes": [str(s) for s in spec.sizes],
        "hypers": [{"name": h.name, "default": _float_literal(h.default)} for h in spec.hypers],
        "delay_states": list(plan.delay_states),
        "params": params, "first_param": params[0]["name"] if params else "",
        "sizes_for_params": _take_sizes([str(s) for s in spec.sizes], ("input_size", "num_units"),
                                        _used_sizes(d for _, dims in _param_dims(plan) for d in dims)),
        "sizes_for_state": _take_sizes(_needed([s.size for s in spec.states], spec), ("num_units",),
                                       _used_sizes(s.size for s in spec.states)),
        "sizes_for_output": _take_sizes(_needed([plan.output_size], spec), ("num_units",),
                                        _used_sizes([plan.output_size])),
        "sizes_from_dict": _sizes_from_dict(plan),
        "sizes_for_input_width": _size_lines(spec, _used_sizes([spec.input.size])),
        "sizes_for_pack": _size_lines(spec, _pack_sizes(plan)),
        "sizes_for_unpack": _size_lines(spec, _unpack_sizes(plan)),
        "input_width": print_index(spec.input.size),
        "input_size_text": display_index(spec.input.size),
        "output_size": print_index(plan.output_size),
        "size_rules": _size_rules(plan),
        "input_name": spec.input.name,
        "hoisted": hoisted, "gemms": gemms,
        "backends": [{"name": b.name, "template": b.template} for b in backends.REGISTRY.values()],
        **{b.name: b.context(plan) for b in backends.REGISTRY.values()},
    }


def render_module(plan: FusedPlan, spec_path: str, key: str) -> str:
    """The generated module's text."""
    return environment().get_template("module.py.j2").render(**context(plan, spec_path, key))
