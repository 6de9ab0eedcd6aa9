"""Stage 4b (FusedPlan -> module text): the Jinja environment and the template context.

Everything a template receives is a string, an int, a bool or a list/dict of
those: expressions are printed here by :mod:`cellgen.printing`, structure lives
in ``templates/``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import sympy

from cellgen import __version__
from cellgen.analysis import linear_order
from cellgen.dsl import INPUT_SIZE, NUM_UNITS
from cellgen.plan import (
    OUT,
    PRE,
    X,
    FusedPlan,
    Loop,
    hyper_name,
    new_state_array,
    size_name,
    state_array,
)
from cellgen.spec import SpecError
from cellgen.printing import (
    DTYPES,
    NumbaPrinter,
    NumPyVectorPrinter,
    atomic_minmax,
    display_index,
    print_index,
    rational_tanh,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
#: Per-step views the kernels index instead of the [T, ...] arrays.
STEP_VIEWS = {PRE: "pre_t", X: "x_t", OUT: "out_t"}
#: The CPU kernels write the batch-major output [B, T, out] directly: ``out[b, t, j]``
#: (a per-step view ``out[:, t]`` would have a non-contiguous type and not vectorize).
CPU_ARRAYS = {PRE: "pre_t", X: "x_t"}
CPU_ROWS = {OUT: "b, t"}


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


def templates_digest() -> str:
    """sha256 over every template file: part of each generated module's key."""
    h = hashlib.sha256()
    for path in sorted(TEMPLATES.glob("*.j2")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


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


def _take_sizes(names: list[str], given: tuple[str, ...] = ()) -> str:
    """Bind the kernel variables of a function's sizes, one line: the ``given`` positional ones
    (``n_num_units = num_units``) and the keyword ones, checked
    (``n_num_proj, = _rt.take_sizes(sizes, ("num_proj",), SIZES)``)."""
    lines = [f"{size_name(n)} = {n}" for n in given]
    taken = "".join(repr(n) + ", " for n in names)
    call = f"_rt.take_sizes(sizes, ({taken}), SIZES)"
    lines.append(f"{''.join(size_name(n) + ', ' for n in names)}= {call}" if names else call)
    return "; ".join(lines)


def _needed(exprs, spec) -> list[str]:
    symbols = set().union(*(sympy.sympify(e).free_symbols for e in exprs)) if exprs else set()
    return [str(s) for s in (INPUT_SIZE, *spec.sizes) if s in symbols]


def _sizes_from_dict(spec) -> str:
    """``n_input_size = sizes['input_size']; ...``: every size's kernel variable from a call's sizes."""
    return "; ".join(f"{size_name(n)} = sizes[{n!r}]" for n in map(str, spec.all_sizes))


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
    return text if den == 1 else f"({text}) // {print_index(den, names)}"


def _param_dims(plan: FusedPlan):
    spec = plan.spec
    for lin in spec.linears:
        yield {"name": lin.kernel}, [lin.rows, lin.columns]
        if lin.bias is not None:
            yield {"name": lin.bias}, [lin.columns]
    for p in spec.params:
        yield {"name": p.name}, [p.size]


def _reference(plan: FusedPlan) -> dict[str, Any]:
    spec, p = plan.spec, NumPyVectorPrinter()
    order = linear_order(spec)
    linears = [{"operands": [p.doprint(o) for o in lin.operands], "kernel": lin.kernel, "bias": lin.bias,
                "gates": [str(g) for g in lin.gates]} for lin in order]
    return {
        "reference_linears": linears,
        "reference_updates": [p.doprint(expr) for _, expr, _ in spec.updates],
        "reference_output": p.doprint(spec.output),
        "unit_params": [v.name for v in spec.params],
    }


def _cpu(plan: FusedPlan) -> dict[str, Any]:
    spec = plan.spec
    states = [state_array(n) for n in plan.recurrent_states]
    hoisted = plan.hoisted
    args: list[tuple[str, str]] = []
    if hoisted is not None:
        args.append((PRE, "pre"))
        if hoisted.delayed:
            args.append(("pre0", "pre0"))
    if plan.uses_x or plan.uses_x_prev:
        args.append(("xs", "xs"))
    if plan.uses_x_prev:
        args.append(("x0", "x0"))
    batch_outer = plan.scan_only and not plan.double_buffered
    # a scan with a hoisted GEMM computes it by time blocks inside its parallel region
    # (fused_scan): the projection of a block stays in cache for the scan that reads it
    fused_scan = batch_outer and hoisted is not None
    # the step loop too computes the hoisted GEMM by time blocks (each thread its own batch
    # rows, just before the steps that read them) unless the driver computed it up front
    if hoisted is not None:
        if not (plan.uses_x or plan.uses_x_prev):  # the hoisted GEMM reads xs; it may be passed already
            args.append(("xs", "xs"))
        args += [("w_in", "w_in"), ("b_in", "b_in")]
    args.append(("lengths", "lengths"))
    args += [(f"w_rec{g.stage}", f"w_rec[{g.stage}]") for g in plan.gemms]  # packed panels
    args += [(plan.param_arrays[n], f"params[{n!r}]") for n in (*plan.unit_params, *plan.epilogue_biases)]
    args += [(hyper_name(h.name), f"dtype.type(hyper[{h.name!r}])") for h in spec.hypers]
    args += [(size_name(str(s)), f"sizes[{str(s)!r}]") for s in spec.all_sizes]
    names = list(spec.state(n).name for n in plan.recurrent_states)
    args += [(state_array(n), f"np.array(states[{list(_state_names(spec)).index(n)}], order='C')") for n in names]
    args.append((OUT, "out"))

    views = []
    if hoisted is not None:
        if fused_scan:  # pre: a ring of time slots
            views.append("pre_t = pre[t % pre.shape[0]]")
            if hoisted.delayed:
                views.append("pre_prev = pre0 if t == 0 else pre[(t - 1) % pre.shape[0]]")
        else:  # pre: the block of steps s0.. (all T steps when computed up front)
            views.append("pre_t = pre[t - s0]")
            if hoisted.delayed:  # never blocked: the driver computes it up front
                views.append("pre_prev = pre0 if t == 0 else pre[t - s0 - 1]")
    if plan.uses_x:
        views.append("x_t = xs[t]")
    if plan.uses_x_prev:
        views.append("x_prev = x0 if t == 0 else xs[t - 1]")

    buffers = []
    for g in plan.gemms:  # a GEMM result spans whole packed panels
        buffers.append({"name": g.result, "width": f"w_rec{g.stage}.shape[0] * w_rec{g.stage}.shape[2]"})
        if g.operand_buffer is not None:
            buffers.append({"name": g.operand_buffer, "width": print_index(g.rows)})

    # every name a helper may need: kernel arguments, step buffers, per-step views
    view_names = [v.split(" = ")[0] for v in views]
    double_buffered = [{"old": state_array(n), "new": new_state_array(n)} for n in plan.double_buffered]
    # a double-buffered state's final value is in its old array after an even number of steps
    finals = [f"{state_array(n)} if T % 2 == 0 else {new_state_array(n)}" if n in plan.double_buffered
              else state_array(n) for n in plan.recurrent_states]
    # what a thread of the loop may work on: the kernel's arguments and step buffers
    step_args = [a for a, _ in args] + [b["name"] for b in buffers] + [s["new"] for s in double_buffered]
    names_in_kernel = step_args + view_names
    # the step loop (not a scan) of a plan with a hoisted GEMM: it may compute it by blocks
    step_hoisted = hoisted is not None and not batch_outer
    kernels = []
    for dtype in DTYPES:
        tanh = _tanh_helper(dtype)
        kp = KernelPrinter(plan, dtype, fast_tanh=tanh["name"] if tanh else None,
                           arrays=CPU_ARRAYS, rows=CPU_ROWS)
        schedule = []
        for kind, index in plan.schedule():
            if kind == "gemm":
                g = plan.gemms[index]
                operand = state_array(g.direct_state) if g.direct_state else g.operand_buffer
                schedule.append({"kind": "gemm", "operand": operand, "weight": f"w_rec{index}", "result": g.result})
            else:
                epi = next(e for e in plan.epilogues if e.index == index)
                masked = [m for m in (kp.masked_loop(loop) for loop in epi.loops) if m is not None]
                loops = [kp.loop(loop) for loop in epi.loops]
                text = "\n".join(f"{lp.domain}\n{lp.body}" for lp in (*loops, *masked))
                schedule.append({"kind": "epilogue", "loops": loops, "masked_loops": masked,
                                 "helper": f"_epilogue{index}_{dtype}",
                                 "params": _used(["t", "lengths", *names_in_kernel], text + "\nt lengths")})
        loops = [kp.loop(loop) for e in plan.epilogues for loop in e.loops]
        # a scan writes its masked steps too (zero outputs), so its output needs no zeroing
        scan_masked = [m for m in (kp.masked_loop(loop) for e in plan.epilogues for loop in e.loops) if m is not None]
        scan_text = "\n".join([*views, *(f"{lp.domain}\n{lp.body}" for lp in (*loops, *scan_masked))])
        # a thread of the step loop takes only what it uses: every argument of the parallel
        # function costs Numba's parfor lowering time (~35 ms each)
        step_text = "\n".join([*views, "out b_zero gemm_fn by_rows",
                                *(f"{s['old']} {s['new']}" for s in double_buffered),
                                "pre xs w_in b_in blocked" if step_hoisted else "",
                                *(" ".join(i["params"]) if i["kind"] == "epilogue" else
                                  f"{i['operand']} {i['weight']} {i['result']}" for i in schedule)])
        kernels.append({"dtype": dtype, "schedule": schedule, "loops": loops, "masked_loops": scan_masked,
                        "tanh": tanh, "scan": f"_scan_{dtype}",
                        "step_params": _used([*step_args, "b_zero", "gemm_fn", *(["blocked"] if step_hoisted else []),
                                              "by_rows"],
                                             step_text),
                        "scan_params": _used(["T", "lengths", *step_args], scan_text + "\nT lengths")})
    # the names differ between dtypes only in literals and helper names, never in parameters:
    # one Python driver (_cpu) serves every dtype's kernels
    step_params, scan_params = kernels[0]["step_params"], kernels[0]["scan_params"]
    assert all(k["step_params"] == step_params and k["scan_params"] == scan_params for k in kernels)
    # what each thread of the parallel region takes after (q, nth); the one-thread loop
    if fused_scan:
        thread_params = ["chunk", *scan_params, *(n for n in ("xs", "w_in", "b_in", "gemm_fn") if n not in scan_params)]
    else:
        thread_params = scan_params if batch_outer else ["sync", *step_params]
    for k in kernels:
        dtype = k["dtype"]
        k["thread"] = (f"_fused_scan_{dtype}" if fused_scan else f"_scan_rows_{dtype}" if batch_outer
                       else f"_steps_{dtype}")
        k["serial"] = k["scan"] if batch_outer else f"_steps_{dtype}"

    units = _scan_units(plan, kernels[0]["loops"], scan_params) if fused_scan else None
    delay_index = None
    if plan.delay_states:
        delay_index = list(_state_names(spec)).index(plan.delay_states[0])
    return {
        "kernels": kernels, "args": [a for a, _ in args], "call_args": [c for _, c in args],
        "double_buffered": double_buffered, "finals": finals, "buffers": buffers,
        "states": states, "step_views": "\n".join(views), "batch_outer": batch_outer,
        "fused_scan": fused_scan, "step_hoisted": step_hoisted,
        "step_params": step_params, "scan_params": scan_params, "thread_params": thread_params,
        "units": units,
        "delay_index": delay_index,
        "output_size": print_index(plan.output_size),
        # work per batch row: a step loop's multiply-adds per step (its units when it has no
        # GEMM), a scan's whole call (T steps of units: its rows are split, not its steps)
        "step_work": f"T * {print_index(plan.output_size)}" if batch_outer
        else print_index(sum((g.rows * g.width for g in plan.gemms), sympy.Integer(0)))
        if plan.gemms else print_index(plan.output_size),
    }


def _scan_units(plan: FusedPlan, loops: list[LoopText], scan_params: list[str]) -> dict[str, Any] | None:
    """How a one-row fused scan splits among threads by units, or None when it cannot.

    A one-row scan (B = 1) cannot split by rows. It splits by units when every loop runs
    over the same D units (a size symbol) and reads the hoisted columns ``pre[b, j + g * D]``
    only: then unit j of every gate lies in column panels its thread projects itself. Each
    thread scans compact copies of its units (the scan called with D = its unit count):
    ``scan_args`` maps each scan parameter to what the thread passes instead.
    """
    domains = {loop.domain for e in plan.epilogues for loop in e.loops}
    hoisted = plan.hoisted
    if len(domains) != 1 or hoisted is None:
        return None
    (domain,) = domains
    if not isinstance(domain, sympy.Symbol):
        return None
    if not all(sympy.simplify(e / domain).is_Integer for b in hoisted.blocks for e in (b.dest_col, b.width)
               if e != 0):
        return None
    for lp in loops:
        for index in re.findall(r"\bpre_(?:t|prev)\[b, ([^\]]+)\]", lp.body):
            offset = sympy.sympify(index, locals={size_name(str(domain)): domain}) - sympy.Symbol("j")
            if offset != 0 and not sympy.simplify(offset / domain).is_Integer:
                return None
    states = [state_array(n) for n in plan.recurrent_states]
    units_params = [plan.param_arrays[n] for n in plan.unit_params]
    args, copies, first = [], [], None
    for name in scan_params:
        if name == PRE:
            args.append("ring")
        elif name == "pre0":
            args.append("first")
            first = name
        elif name == size_name(str(domain)):
            args.append("units")
        elif name in states:
            args.append(f"{name}_q")
            copies.append(name)
        elif name == OUT:
            args.append("out_q")
        elif name in units_params:
            args.append(f"{name}[j0:j1]")
        elif name in ("T", "lengths") or name in {size_name(str(s)) for s in plan.spec.all_sizes}:
            args.append(name)
        else:  # an array the split does not know how to cut
            return None
    return {"size": size_name(str(domain)), "scan_args": args, "states": copies, "first": first}


def _used(candidates: list[str], text: str) -> list[str]:
    """The candidate names ``text`` mentions, in candidate order, each once: a helper's parameters."""
    seen: list[str] = []
    for name in candidates:
        if name not in seen and re.search(rf"\b{re.escape(name)}\b", text):
            seen.append(name)
    return seen


#: dtypes whose kernels call the rational tanh (float64 keeps libm's math.tanh).
FAST_TANH_DTYPES = ("float32",)


def _tanh_helper(dtype: str) -> dict[str, Any] | None:
    """The ``fast_tanh`` helper of a dtype's kernels, printed from :func:`rational_tanh`."""
    if dtype not in FAST_TANH_DTYPES:
        return None
    x = sympy.Symbol("x", real=True)
    steps, result = rational_tanh(x)
    p = NumbaPrinter(dtype)
    return {"name": f"_tanh_{dtype}", "arg": p.doprint(x),
            "lines": [f"{p.doprint(s)} = {p.doprint(e)}" for s, e in steps], "result": p.doprint(result)}


def _state_names(spec) -> tuple[str, ...]:
    return tuple(s.name for s in spec.states)


def _blocks(blocks) -> list[dict[str, str]]:
    return [{"kernel": b.kernel, "row_start": print_index(b.row_start), "rows": print_index(b.rows),
             "dest_row": print_index(b.dest_row), "dest_col": print_index(b.dest_col),
             "width": print_index(b.width)} for b in blocks]


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


def context(plan: FusedPlan, spec_path: str, key: str) -> dict[str, Any]:
    """Everything ``templates/module.py.j2`` needs, as plain strings and ints."""
    from cellgen.render_cuda import cuda_context  # render_cuda builds on this module

    spec = plan.spec
    hoisted = None
    if plan.hoisted is not None:
        h = plan.hoisted
        hoisted = {"rows": print_index(h.rows), "width": print_index(h.width), "blocks": _blocks(h.blocks),
                   "whole": _whole_block(h.blocks, h.rows, h.width),
                   "biases": [{"bias": b.bias, "dest_col": print_index(b.dest_col), "width": print_index(b.width)}
                              for b in h.biases], "delayed": h.delayed}
    gemms = [{"rows": print_index(g.rows), "width": print_index(g.width), "blocks": _blocks(g.blocks),
              "whole": _whole_block(g.blocks, g.rows, g.width)} for g in plan.gemms]
    params = _params(plan)
    return {
        "version": __version__, "spec_path": spec_path, "key": key, "name": spec.name,
        "summary": _docstring_text((spec.doc.strip().splitlines() or [spec.name])[0]),
        "states": [{"name": s.name, "size": print_index(s.size), "delay": s.name in plan.delay_states}
                   for s in spec.states],
        "sizes": [str(s) for s in spec.sizes],
        "hypers": [{"name": h.name, "default": _float_literal(h.default)} for h in spec.hypers],
        "delay_states": list(plan.delay_states),
        "params": params, "first_param": params[0]["name"] if params else "",
        "sizes_for_params": _take_sizes([str(s) for s in spec.sizes], ("input_size", "num_units")),
        "sizes_for_state": _take_sizes(_needed([s.size for s in spec.states], spec), ("num_units",)),
        "sizes_for_output": _take_sizes(_needed([plan.output_size], spec), ("num_units",)),
        "sizes_from_dict": _sizes_from_dict(spec),
        "input_width": print_index(spec.input.size),
        "input_size_text": display_index(spec.input.size),
        "output_size": print_index(plan.output_size),
        "size_rules": _size_rules(plan),
        "input_name": spec.input.name,
        "hoisted": hoisted, "gemms": gemms,
        "cpu": _cpu(plan),
        "cuda": cuda_context(plan),
        **_reference(plan),
    }


def render_module(plan: FusedPlan, spec_path: str, key: str) -> str:
    """The generated module's text."""
    return environment().get_template("module.py.j2").render(**context(plan, spec_path, key))
