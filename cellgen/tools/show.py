"""`cellgen show`: the fused plan as a person reads it (stages, weights, hoisting, epilogues, FLOPs),
and its training plan (what the forward saves, the reverse step, the GEMMs after it)."""

from __future__ import annotations

import sympy

from cellgen.frontend.dsl import INPUT_SIZE, NUM_UNITS
from cellgen.ir.backward import TrainingPlan
from cellgen.ir.plan import FusedPlan, GemmKind
from cellgen.codegen.printing import display_index as print_index


def _dims(expr: sympy.Expr, sizes: dict[sympy.Symbol, int]) -> str:
    value = sympy.sympify(expr).subs(sizes)
    return f"{print_index(expr)}={value}" if value.is_Integer and not sympy.sympify(expr).is_Integer else str(value)


def flops(plan: FusedPlan, batch: int, sizes: dict[sympy.Symbol, int]) -> dict[str, int]:
    """FLOPs per time step: hoisted GEMM (per step share), recurrent GEMMs, epilogue ops."""
    out = {"hoisted": 0, "recurrent": 0, "epilogue": 0}
    if plan.hoisted is not None:
        out["hoisted"] = int(2 * batch * sympy.sympify(plan.hoisted.rows * plan.hoisted.width).subs(sizes))
    for g in plan.gemms:
        out["recurrent"] += int(2 * batch * sympy.sympify(g.rows * g.width).subs(sizes))
    for e in plan.epilogues:
        for loop in e.loops:
            out["epilogue"] += int(batch * loop.ops * sympy.sympify(loop.domain).subs(sizes))
    return out


def describe(plan: FusedPlan, batch: int = 64, sizes: dict[str, int] | None = None) -> str:
    """A multi-line description of the plan, with FLOPs per step at the given sizes."""
    spec = plan.spec
    given = dict(sizes or {})
    numeric = {INPUT_SIZE: given.get("input_size", 256), NUM_UNITS: given.get("num_units", 256)}
    for s in spec.sizes:
        numeric[s] = given.get(str(s), numeric[NUM_UNITS])
    lines = [f"cell {spec.name}  ({spec.path})"]
    if spec.doc:
        lines.append(f"  {spec.doc.strip().splitlines()[0]}")
    lines.append(f"  states: {', '.join(f'{s.name}[{print_index(s.size)}]' for s in spec.states)}"
                 + (f"   delay (x_t-1, hoisted): {', '.join(plan.delay_states)}" if plan.delay_states else ""))
    lines.append(f"  sizes for figures: {', '.join(f'{k}={v}' for k, v in numeric.items())}, batch={batch}")
    loop = plan.time_loop
    in_place = "yes" if loop.in_place else "no"
    lines.append(f"  time loop: {loop.direction.value}; states may be updated in place: {in_place}"
                 + (f"; saved per step: {', '.join(n for n, _ in loop.saved)}" if loop.saved else ""))
    lines.append("")
    if plan.hoisted is None:
        lines.append("hoisted GEMM: none (no linear reads the input)")
    else:
        h = plan.hoisted
        lines.append(f"hoisted GEMM ({h.kind.value}, once over all T*B rows): x[T*B, {_dims(h.rows, numeric)}] @ "
                     f"W[{_dims(h.rows, numeric)}, {_dims(h.width, numeric)}]")
        for b in h.blocks:
            delayed = " (x_t-1: read one step late)" if b.delayed else ""
            lines.append(f"    cols {print_index(b.dest_col)}..+{print_index(b.width)}: "
                         f"{b.kernel}[rows {print_index(b.row_start)}..+{print_index(b.rows)}]{delayed}")
        for b in h.biases:
            lines.append(f"    bias {b.bias} -> cols {print_index(b.dest_col)}..+{print_index(b.width)}")
    for g in plan.gemms:
        ops = " | ".join(o.label if len(o.label) < 40 else o.label[:37] + "..." for o in g.operands)
        lines.append(f"recurrent GEMM {g.stage} ({g.kind.value}, per step): [{ops}][B, {_dims(g.rows, numeric)}] @ "
                     f"W[{_dims(g.rows, numeric)}, {_dims(g.width, numeric)}]  linears: {', '.join(g.linears)}")
    if plan.scan_only:
        lines.append("recurrent GEMMs: 0  -> the step is a pure elementwise scan")
    lines.append("")
    lines.append("per step: " + " -> ".join(f"{k} {i}" for k, i in plan.schedule()))
    for e in plan.epilogues:
        for loop in e.loops:
            lines.append(f"epilogue {e.index}, loop over {print_index(loop.domain)} units ({loop.ops} ops/unit):")
            for sym, expr in loop.temps:
                lines.append(f"    {sym} = {expr}")
            for st in loop.stores:
                masked = "" if st.masked is None else f"   (past length: {st.masked})"
                lines.append(f"    {st.target} = {st.value}{masked}")
    f = flops(plan, batch, numeric)
    total = sum(f.values())
    lines.append("")
    lines.append(f"FLOPs per step: hoisted {f['hoisted']:,} + recurrent {f['recurrent']:,} + epilogue "
                 f"{f['epilogue']:,} = {total:,}")
    in_place = [n for n in plan.recurrent_states if n not in plan.double_buffered]
    lines.append(f"states updated in place: {', '.join(in_place) or 'none'}"
                 f"; double-buffered: {', '.join(plan.double_buffered) or 'none'}")
    lines.extend(gpu_steps(plan, batch, numeric))
    return "\n".join(lines)


def gpu_steps(plan: FusedPlan, batch: int, sizes: dict[sympy.Symbol, int]) -> list[str]:
    """The CUDA backend's step loop at these sizes (:func:`cellgen.backends.cuda.steps.describe`)."""
    from cellgen.backends.cuda.layout import cuda_layout
    from cellgen.backends.cuda.steps import describe as describe_steps

    return describe_steps(cuda_layout(plan), batch, sizes)


def saved_bytes(tp: TrainingPlan, batch: int, sizes: dict[sympy.Symbol, int], itemsize: int) -> dict[str, int]:
    """Bytes per time step the training forward saves: each saved value, and ``recompute``'s
    per-step share (the states only, kept at block starts)."""
    per = {sv.name: int(batch * itemsize * sympy.sympify(sv.width).subs(sizes)) for sv in tp.saved}
    spec = tp.forward.spec
    states = sum(int(batch * itemsize * sympy.sympify(spec.state(n).size).subs(sizes))
                 for n in tp.forward.recurrent_states)
    return {**per, "total": sum(per.values()), "states": states}


def describe_training(tp: TrainingPlan, batch: int = 64, sizes: dict[str, int] | None = None) -> str:
    """The training plan: what the forward saves (bytes per step), the reverse step, the GEMMs after it."""
    plan, spec = tp.backward, tp.backward.spec
    given = dict(sizes or {})
    numeric = {INPUT_SIZE: given.get("input_size", 256), NUM_UNITS: given.get("num_units", 256)}
    for s in spec.sizes:
        numeric[s] = given.get(str(s), numeric[NUM_UNITS])
    f32, f64 = saved_bytes(tp, batch, numeric, 4), saved_bytes(tp, batch, numeric, 8)
    lines = ["", f"training (dynamic_rnn_vjp) of {spec.name}:",
             "  the forward saves per step:",
             *(f"      {sv.array}[B, {_dims(sv.width, numeric)}]  ({sv.kind}"
               + ("" if sv.value is None else f": {sv.value}") + ")" for sv in tp.saved),
             f"  = {f32['total']:,} bytes per step float32 ({f64['total']:,} float64) at batch={batch}; "
             f"recompute=True keeps the states at block starts ({f32['states']:,} bytes per checkpointed step "
             f"float32) plus one block's saved values",
             "  reverse step: " + " -> ".join(
                 f"epilogue {i}" if k == "epilogue" else f"d_operands{tp.stages[i]} = dg{tp.stages[i]}[t] @ "
                 f"W{tp.stages[i]}^T" for k, i in plan.schedule())]
    for e in plan.epilogues:
        for loop in e.loops:
            lines.append(f"  backward epilogue {e.index}, loop over {print_index(loop.domain)} units "
                         f"({loop.ops} ops/unit):")
            for sym, expr in loop.temps:
                lines.append(f"      {sym} = {expr}")
            for st in loop.stores:
                lines.append(f"      {st.target} = {st.value}")
    lines.append("  after the loop, ONE GEMM each over all T*B rows:")
    for w in tp.weight_grads:
        g = next(g for g in plan.gemms if g.stage == w.stage)
        lines.append(f"      d W{w.stage} [{_dims(g.rows, numeric)}, {_dims(g.width, numeric)}] = "
                     f"{w.rows}^T @ {w.d_gates}  ({g.kind.value} -> {GemmKind.WEIGHT_GRAD.value})")
    if plan.hoisted is not None:
        h = plan.hoisted
        lines.append(f"      d W_hoisted [{_dims(h.rows, numeric)}, {_dims(h.width, numeric)}] = x^T @ dpre; "
                     f"d inputs = dpre @ W_hoisted^T")
    for b in tp.bias_grads:
        lines.append(f"      d {b.bias} = column sums of {b.array}[..., {print_index(b.col)}..+{print_index(b.width)}]")
    for p in tp.unit_params:
        lines.append(f"      d {p} = sum over rows and steps of dp_{p}")
    return "\n".join(lines)
