"""Printers: exact strings (as SymPy's own printer tests do)."""

from __future__ import annotations

import math

import pytest
import sympy

from cellgen.dsl import NUM_UNITS, sigmoid
from cellgen.ir.plan import UNIT
from cellgen.codegen.printing import NumbaPrinter, NumPyVectorPrinter, atomic_minmax, print_index

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
    # a finite constant needs no NaN test
    assert f32(sympy.Max(x, 0)) == "(np.float32(0.0) if np.float32(0.0) > x else x)"


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
