"""The CPU backend's template context (FusedPlan -> ``templates/cpu/kernels.py.j2``'s strings).

The whole time loop runs in compiled code on cellgen's packed GEMM micro-kernel
(:mod:`cellgen.backends.cpu.gemm`), threaded by :mod:`.pool` and :mod:`.sync`.
"""

from __future__ import annotations

import re
from typing import Any

import sympy

from cellgen.codegen.loops import KernelPrinter, LoopText
from cellgen.codegen.printing import DTYPES, NumbaPrinter, print_index, rational_tanh
from cellgen.ir.plan import (
    OUT,
    PRE,
    X,
    FusedPlan,
    hyper_name,
    new_state_array,
    size_name,
    state_array,
)

#: The CPU kernels write the batch-major output [B, T, out] directly: ``out[b, t, j]``
#: (a per-step view ``out[:, t]`` would have a non-contiguous type and not vectorize).
CPU_ARRAYS = {PRE: "pre_t", X: "x_t"}


CPU_ROWS = {OUT: "b, t"}


def context(plan: FusedPlan) -> dict[str, Any]:
    """Everything ``templates/cpu/kernels.py.j2`` needs (under the module context's ``cpu``)."""
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

