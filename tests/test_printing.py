"""Printers: exact strings (as SymPy's own printer tests do)."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sympy

from cellgen.backends.reference.context import context as reference_context
from cellgen.build import compile_spec
from cellgen.codegen.loops import KernelPrinter
from cellgen.codegen.names import Namer, template_names
from cellgen.codegen.printing import NumbaPrinter, NumPyVectorPrinter, atomic_minmax, print_index
from cellgen.dsl import NUM_UNITS, sigmoid
from cellgen.ir.plan import UNIT, Loop, Store

x, y, c = sympy.symbols("x y c", real=True)
j, n = UNIT, NUM_UNITS


def f32(expr: sympy.Expr) -> str:
    return NumbaPrinter("float32").doprint(expr)


def f64(expr: sympy.Expr) -> str:
    return NumbaPrinter("float64").doprint(expr)


@pytest.mark.parametrize("expr, want32, want64", [
    (sympy.Float(0.5) * x, "np.float32(0.5)*x", "0.5*x"),
    (1 - x, "np.float32(1.0) - x", "1.0 - x"),
    (2 * x, "np.float32(2.0)*x", "2.0*x"),
    (x / 4, "(np.float32(0.25))*x", "(0.25)*x"),
    (sympy.oo, "np.float32(math.inf)", "math.inf"),
    (-sympy.oo, "np.float32(-math.inf)", "-math.inf"),
])
def test_literals_are_typed_in_the_kernel_dtype(expr, want32: str, want64: str) -> None:
    assert f32(expr) == want32
    assert f64(expr) == want64


def test_sigmoid_is_printed_without_exp() -> None:
    assert f32(sigmoid(x)) == "(np.float32(0.5) * math.tanh(np.float32(0.5) * x) + np.float32(0.5))"
    assert f64(sigmoid(x + y)) == "(0.5 * math.tanh(0.5 * (x + y)) + 0.5)"
    assert NumbaPrinter("float32", fast_tanh="_tanh").doprint(sigmoid(x)) == \
        "(np.float32(0.5) * _tanh(np.float32(0.5) * x) + np.float32(0.5))"
    assert "exp" not in f64(sigmoid(-1000 * x))


def test_math_functions() -> None:
    assert f64(sympy.tanh(x)) == "math.tanh(x)"
    assert NumbaPrinter("float64", fast_tanh="_tanh").doprint(sympy.tanh(x)) == "_tanh(x)"
    assert f64(sympy.exp(-x)) == "math.exp(-x)"
    assert f64(sympy.log(x)) == "math.log(x)"
    assert f64(sympy.Abs(x)) == "abs(x)"


def test_indexed_reads() -> None:
    pre = sympy.Indexed(sympy.IndexedBase("pre"), j + 2 * n)
    diag = sympy.Indexed(sympy.IndexedBase("p_w_f_diag"), j)
    p = NumbaPrinter("float32", batched=("pre",))
    assert p.doprint(pre) == "pre[b, j + 2*n_num_units]"
    assert p.doprint(diag) == "p_w_f_diag[j]"
    assert p.doprint(pre * diag) == "p_w_f_diag[j]*pre[b, j + 2*n_num_units]"
    renamed = NumbaPrinter("float64", batched=("pre",), row="r", arrays={"pre": "pre_t"})
    assert renamed.doprint(pre) == "pre_t[r, j + 2*n_num_units]"


@pytest.mark.parametrize("expr, want", [
    (x ** -1, "(np.float32(1.0) / x)"),
    (1 / (x + y), "(np.float32(1.0) / (x + y))"),
    (x ** 2, "(x*x)"),
    ((x + y) ** 2, "((x + y)*(x + y))"),
    (x ** 3, "(x*x*x)"),
    (x ** 4, "(x*x*x*x)"),
    (x ** 5, "x**np.float32(5.0)"),
    (sympy.sqrt(x), "math.sqrt(x)"),
    (1 / sympy.sqrt(x), "(np.float32(1.0) / math.sqrt(x))"),
    (x ** sympy.Rational(3, 2), "x**np.float32(1.5)"),
    # a Pow in a denominator or as a base stays one operand (found by the fuzzer: w/(1+s**2)**2)
    (y / (1 + x ** 2) ** 2, "y/(((x*x) + np.float32(1.0))*((x*x) + np.float32(1.0)))"),
    (sympy.Pow((x + y) ** 2, sympy.Rational(3, 2), evaluate=False), "((x + y)*(x + y))**np.float32(1.5)"),
    (sympy.Pow(x ** 5, 3, evaluate=False), "((x**np.float32(5.0))*(x**np.float32(5.0))*(x**np.float32(5.0)))"),
    (y / sympy.sqrt(x + 1), "y/math.sqrt(x + np.float32(1.0))"),
])
def test_pow(expr, want: str) -> None:
    assert f32(expr) == want


def test_max_min_nest() -> None:
    # NaN-propagating (NumPy's maximum/minimum): a NaN on either side gives NaN
    assert f64(sympy.Max(x, y)) == "(x if x > y or x != x else y)"
    assert f64(sympy.Min(x, y)) == "(x if x < y or x != x else y)"
    inner = "(x if x > y or x != x else y)"
    assert f64(sympy.Max(x, y, c)) == f"(c if c > {inner} or c != c else {inner})"
    # TF's clip: Min(Max(v, -clip), clip)
    assert f64(sympy.Min(sympy.Max(x, -c), c)) == \
        "(c if c < (x if x > -c or x != x else -c) or c != c else (x if x > -c or x != x else -c))"
    # a constant needs no NaN test, and is compared on the right (``x < 0.0`` is ``0.0 > x``, NaN too)
    assert f32(sympy.Max(x, 0)) == "(np.float32(0.0) if x < np.float32(0.0) else x)"
    assert f64(sympy.Min(x, 2)) == "(2.0 if x > 2.0 else x)"


def test_a_constant_compared_on_the_right_selects_the_same() -> None:
    from numba import njit

    left = njit(lambda v: 0.0 if 0.0 > v else v)  # noqa: SIM300 - the form printed before
    right = njit(eval(f"lambda x: {f64(sympy.Max(x, 0))}"))  # noqa: S307 - printed by our printer
    for v in (float("nan"), -0.0, 0.0, -1.0, 2.0, float("inf"), -float("inf")):
        assert np.array(left(v)).tobytes() == np.array(right(v)).tobytes(), v


@pytest.mark.parametrize("fn", [sympy.Max, sympy.Min])
def test_max_min_propagate_nan_when_compiled(fn) -> None:
    from numba import njit

    text = f64(fn(x, y))
    kernel = njit(error_model="numpy")(eval(f"lambda x, y: {text}"))  # noqa: S307 - printed by our printer
    nan, inf = float("nan"), float("inf")
    for a, b in ((nan, 1.0), (1.0, nan), (nan, nan), (-inf, nan), (nan, inf)):
        assert math.isnan(kernel(a, b)), (text, a, b)
    assert kernel(1.0, 2.0) == fn(1.0, 2.0)
    assert kernel(-inf, 2.0) == fn(-inf, 2.0)


def test_atomic_minmax_gives_arguments_temporaries() -> None:
    names = iter(sympy.symbols("m0:9"))
    temps, values = atomic_minmax([(c, sympy.exp(x))], [sympy.Min(sympy.Max(sympy.tanh(x) + c, -y), y)],
                                  lambda: next(names))
    m0 = sympy.Symbol("m0")
    assert temps == [(c, sympy.exp(x)), (m0, sympy.tanh(x) + c), (sympy.Symbol("m1"), sympy.Max(m0, -y))]
    assert values == [sympy.Min(sympy.Symbol("m1"), y)]


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        NumbaPrinter("float16")


def test_index_printer() -> None:
    assert print_index(3 * n + j) == "j + 3*n_num_units"
    assert print_index(sympy.Integer(0)) == "0"
    assert print_index(sympy.Symbol("input_size") + n) == "n_input_size + n_num_units"


def test_numpy_vector_printer() -> None:
    p = NumPyVectorPrinter()
    assert p.doprint(sigmoid(x)) == "(0.5 * np.tanh(0.5 * v_x) + 0.5)"
    assert p.doprint(sigmoid(x + y)) == "(0.5 * np.tanh(0.5 * (v_x + v_y)) + 0.5)"
    assert p.doprint(sympy.tanh(x) * y) == "v_y*np.tanh(v_x)"
    assert p.doprint(sympy.Min(sympy.Max(x, -c), c)) == "np.minimum(v_c, np.maximum(v_x, -v_c))"
    assert p.doprint(sympy.oo) == "np.inf"


# -- names of temporaries (cellgen.codegen.names) -------------------------------------------------
SPECS = sorted(Path(__file__).resolve().parents[1].joinpath("specs").glob("*.py"))


def _effects(source: str) -> list[str]:
    """The stores and returns of straight-line ``source`` with every name assigned in it inlined
    (as ASTs: the same dump is the same arithmetic, operation for operation and in order)."""
    env: dict[str, ast.expr] = {}

    class Inline(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.expr:
            return env.get(node.id, node) if isinstance(node.ctx, ast.Load) else node

    out = []
    for st in ast.parse(source).body:
        if isinstance(st, ast.Assign) and isinstance(st.targets[0], ast.Name) and not st.targets[0].id.startswith(
                ("v_", "_y")):  # spec names and the reference step's own stay names
            env[st.targets[0].id] = Inline().visit(st.value)
        elif isinstance(st, ast.Assign):
            out.append(ast.dump(Inline().visit(st.targets[0])) + " = " + ast.dump(Inline().visit(st.value)))
        elif isinstance(st, ast.Return):
            out.append("return " + ast.dump(Inline().visit(st.value)))
    return out


def _unnamed_loop(kp: KernelPrinter, loop) -> str:
    """A loop printed as before naming: CSE temporaries ``t<k>``, max/min arguments ``_mx<k>``, values ``_v<k>``."""
    p = kp.printer
    made = (sympy.Symbol(f"_mx{k}", real=True) for k in range(1000))
    temps, values = atomic_minmax(loop.temps, [s.value for s in loop.stores], made.__next__)
    lines = [f"{p.doprint(s)} = {p.doprint(e)}" for s, e in temps]
    lines += [f"_v{k} = {p.doprint(v)}" for k, v in enumerate(values)]
    lines += [f"{p.doprint(s.target)} = _v{k}" for k, s in enumerate(loop.stores)]
    return "\n".join(lines)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_naming_changes_no_arithmetic(path: Path) -> None:
    """Every kernel loop and the reference step compute, with their temporaries named after gates
    and states, exactly what the unnamed code computes: the same operations in the same order."""
    _, plan = compile_spec(path)
    for dtype in ("float32", "float64"):
        kp = KernelPrinter(plan, dtype)
        for loop in (lp for e in plan.epilogues for lp in e.loops):
            named = kp.loop(loop).body
            assert not re.search(r"\b(t\d+|_mx\d+|_v\d+)\b", named), named
            assert _effects(named) == _effects(_unnamed_loop(kp, loop)), named
    ref = reference_context(plan)
    p = NumPyVectorPrinter()
    lines = [f"{a['name']} = {a['value']}" for lin in ref["linears"] for a in lin["assignments"]]
    lines += [f"{a['name']} = {a['value']}" for a in ref["assignments"]]
    named = "\n".join([*lines, f"return {ref['output']}, ({', '.join(ref['updates'])},)"])
    unnamed = f"return {p.doprint(plan.spec.output)}, ({', '.join(p.doprint(e) for _, e, _ in plan.spec.updates)},)"
    assert _effects(named) == _effects(unnamed), named


def test_lstm_temporaries_read_like_the_equations() -> None:
    _, plan = compile_spec(Path(__file__).resolve().parents[1] / "specs" / "lstm.py")
    kp = KernelPrinter(plan, "float64")
    first, second = (kp.loop(lp).body for e in plan.epilogues for lp in e.loops)
    assert [line.split(" = ")[0] for line in first.splitlines()] == [
        "sig_f", "sig_i", "tanh_j", "new_c_arg", "new_c_max", "new_c", "sig_o", "opnd1[b, j]", "s_c[b, j]"]
    assert "new_c = (new_c_max if new_c_max < hy_cell_clip" in first
    assert "opnd1[b, j] = math.tanh(new_c)*sig_o" in first  # reads nothing stored before it: no temporary
    assert second.splitlines()[-2:] == ["s_h[b, j] = new_h", "out_t[b, j] = new_h"]
    ref = reference_context(plan)
    text = "\n".join(f"{a['name']} = {a['value']}" for lin in ref["linears"] for a in lin["assignments"])
    assert text.count("np.tanh(0.5 *") == 3, text  # each gate's sigmoid once (sig_f, sig_i, sig_o)
    assert ref["updates"] == ["new_c", "new_h"] and ref["output"] == "new_h"


def test_a_value_read_after_a_store_of_its_loop_gets_a_temporary() -> None:
    """A Loop is a parallel assignment: the output reads s_h, which the loop stores first."""
    h = sympy.Indexed(sympy.IndexedBase("s_h"), j)
    loop = Loop(n, (), (Store(h, sympy.tanh(h), None), Store(sympy.Indexed(sympy.IndexedBase("out"), j), 2 * h, 0)))
    from cellgen.ir.plan import FusedPlan

    plan = FusedPlan(spec=compile_spec(Path(__file__).resolve().parents[1] / "specs" / "basic_rnn.py")[0],
                     hoisted=None, gemms=(), epilogues=(), recurrent_states=("h",), delay_states=(),
                     batched_arrays=("s_h", "out"), unit_params=(), epilogue_biases=(), uses_x=False,
                     uses_x_prev=False, output_size=n, param_arrays={})
    body = KernelPrinter(plan, "float64").loop(loop).body
    assert body.splitlines() == ["output = 2.0*s_h[b, j]", "s_h[b, j] = math.tanh(s_h[b, j])", "out_t[b, j] = output"]


def test_names_never_take_a_template_name() -> None:
    namer = Namer()
    assert {"b", "j", "t", "out", "lengths", "np", "math"} <= template_names()
    assert namer.fresh("b") == "b_2" and namer.fresh("b") == "b_3"
    assert namer.fresh("sig_f") == "sig_f" and namer.fresh("sig_f") == "sig_f_2"
    assert "sizes" in template_names() and "hidden" not in template_names()  # code, not docstrings
