"""Stage 4a (SymPy -> source text): the printers. Templates never see a SymPy object.

* :class:`NumbaPrinter` prints one scalar of an epilogue loop for ``@njit`` and
  ``@cuda.jit`` kernels: ``math`` functions CUDA also has, a sigmoid that cannot
  overflow, float literals typed in the kernel's dtype (a bare ``1.0`` would make
  float32 work float64), and ``Indexed`` reads as ``array[b, col]``.
* :class:`IndexPrinter` prints integer index and size arithmetic.
* :class:`NumPyVectorPrinter` prints whole-batch expressions for the reference backend.
* :func:`rational_tanh` is the float32 kernels' tanh as SymPy assignments, printed into a
  helper (``fast_tanh``) by the same printer: no SVML here, so ``math.tanh`` is a scalar
  libm call that stops the epilogue loops from vectorizing.
"""

from __future__ import annotations

import sympy
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from cellgen.frontend.dsl import sigmoid
from cellgen.ir.plan import UNIT, size_name

DTYPES = {"float32": "np.float32", "float64": "np.float64"}


class IndexPrinter(PythonCodePrinter):
    """Integer arithmetic on sizes and the unit index: ``3*n_num_units + j``.

    Sizes print as their kernel variables (:func:`cellgen.ir.plan.size_name`) unless ``raw``
    (for people: ``cellgen show``, messages); ``names`` overrides single symbols.
    """

    def __init__(self, raw: bool = False, names: dict[sympy.Symbol, str] | None = None) -> None:
        super().__init__()
        self.raw, self.names = raw, names or {}

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return str(int(expr))

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        if expr in self.names:
            return self.names[expr]
        if expr == UNIT or self.raw:
            return expr.name
        return size_name(expr.name)


def print_index(expr: sympy.Expr, names: dict[sympy.Symbol, str] | None = None) -> str:
    """Index or size arithmetic as kernel code.

    >>> print_index(sympy.Symbol("num_units", positive=True, integer=True) * 3 + UNIT)
    'j + 3*n_num_units'
    """
    return IndexPrinter(names=names).doprint(sympy.sympify(expr))


def display_index(expr: sympy.Expr) -> str:
    """Size arithmetic for people, in the spec's own names: ``3*num_units``."""
    return IndexPrinter(raw=True).doprint(sympy.sympify(expr))


#: Eigen's float32 tanh: x*P(x^2)/Q(x^2) on x clamped to +-TANH_CLAMP, where float32 tanh is 1.
#: Max error 3.4e-7 against float64 tanh (tests/test_fastmath.py checks it and the end-to-end bound).
TANH_CLAMP = 7.99881172180175781
TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
          -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def _horner(coefficients: tuple[float, ...], v: sympy.Symbol) -> sympy.Expr:
    expr: sympy.Expr = sympy.Float(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        expr = expr * v + sympy.Float(c)
    return expr


def rational_tanh(x: sympy.Symbol) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], sympy.Expr]:
    """tanh(x) as assignments (clamp, square, polynomial) and a result: no exp, no branch (selects).

    The clamp propagates NaN (NumbaPrinter._nest); beyond the clamp the result is exactly +-1,
    as float32 ``np.tanh`` of a large argument is, so that ``sigmoid(-inf) * inf`` is NaN in the
    kernels as in the reference, not a tiny number times inf.

    >>> steps, result = rational_tanh(sympy.Symbol("x"))
    >>> [str(s) for s, _ in steps]
    ['x', 'x', 'x2', 'x_r']
    """
    x2, r = sympy.Symbol(f"{x.name}2"), sympy.Symbol(f"{x.name}_r")
    steps = [(x, sympy.Max(x, -TANH_CLAMP)), (x, sympy.Min(x, TANH_CLAMP)), (x2, x * x),
             (r, x * _horner(TANH_P, x2) / _horner(TANH_Q, x2))]
    return steps, sympy.Piecewise((1, x >= TANH_CLAMP), (-1, x <= -TANH_CLAMP), (r, True))


class NamedPrinter:
    """Prints a named temporary or subexpression by its name (``names``: expression -> name,
    :mod:`cellgen.codegen.names`). The trees are not rewritten: every sum and product prints its
    terms in the order it would unnamed, so the printed arithmetic is the same."""

    names: dict[sympy.Expr, str] = {}

    def _print(self, expr, **kwargs) -> str:
        if self.names and isinstance(expr, sympy.Basic):
            name = self.names.get(expr)
            if name is not None:
                return name
        return super()._print(expr, **kwargs)

    def parenthesize(self, item, level, strict=False) -> str:
        if self.names and isinstance(item, sympy.Basic) and item in self.names:
            return self.names[item]  # a name is one operand
        return super().parenthesize(item, level, strict)

    def define(self, expr: sympy.Expr) -> str:
        """``expr`` printed as the right-hand side of its own name's assignment."""
        name = self.names.pop(expr, None)
        try:
            return self.doprint(expr)
        finally:
            if name is not None:
                self.names[expr] = name


class NumbaPrinter(NamedPrinter, PythonCodePrinter):
    """Scalar kernel code for Numba (CPU ``@njit`` and ``@cuda.jit``).

    ``batched`` names the arrays indexed ``[row, col]``; ``row`` is the batch-row
    variable (``rows`` overrides it per array, e.g. ``{"out": "b, t"}`` for a 3-D
    output indexed directly, which keeps its loops contiguous and vectorizable); the rest
    of ``Indexed`` reads are per-unit ``[col]``. ``fast_tanh``
    names a helper to call instead of ``math.tanh`` (None: ``math.tanh``).
    """

    printmethod = "_numbacode"

    def __init__(self, dtype: str = "float64", batched: tuple[str, ...] = (), row: str = "b",
                 fast_tanh: str | None = None, arrays: dict[str, str] | None = None,
                 rows: dict[str, str] | None = None) -> None:
        super().__init__({"fully_qualified_modules": False, "standard": "python3"})
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype, self.batched, self.row, self.fast_tanh = dtype, set(batched), row, fast_tanh
        self.arrays = arrays or {}
        self.rows = rows or {}

    # -- literals ----------------------------------------------------------------------
    def _literal(self, value: float) -> str:
        text = repr(float(value))
        if text in ("inf", "-inf"):
            text = "math.inf" if text == "inf" else "-math.inf"
        return text if self.dtype == "float64" else f"np.float32({text})"

    def _print_Float(self, expr: sympy.Float) -> str:
        return self._literal(float(expr))

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return self._literal(float(expr))

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return self._literal(float(expr))

    def _print_Infinity(self, expr) -> str:
        return self._literal(float("inf"))

    def _print_NegativeInfinity(self, expr) -> str:
        return self._literal(float("-inf"))

    # -- reads -------------------------------------------------------------------------
    def _print_Indexed(self, expr: sympy.Indexed) -> str:
        name = self.arrays.get(str(expr.base), str(expr.base))
        index = print_index(expr.indices[0])
        if str(expr.base) in self.batched:
            return f"{name}[{self.rows.get(str(expr.base), self.row)}, {index}]"
        return f"{name}[{index}]"

    # -- arithmetic --------------------------------------------------------------------
    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        """Powers as products, quotients and ``math.sqrt``; every form is one operand in the text
        around it (parenthesised), whatever SymPy's precedence of a Pow would let the Mul printer
        assume: ``w/(1 + s**2)**2`` must not print as ``w/(s*s + 1)*(s*s + 1)``."""
        base, exp = expr.base, expr.exp
        if exp == sympy.Rational(1, 2):
            return f"math.sqrt({self._argument(base)})"
        if exp == sympy.Rational(-1, 2):
            return f"({self._literal(1.0)} / math.sqrt({self._argument(base)}))"
        factor = self._operand(base)
        if exp == -1:
            return f"({self._literal(1.0)} / {factor})"
        if exp.is_Integer and 2 <= int(exp) <= 4:
            return "(" + "*".join([factor] * int(exp)) + ")"
        return f"{factor}**{self._print(exp)}"

    @staticmethod
    def _self_contained(exp: sympy.Expr) -> bool:
        """The exponents whose printed power is a call or parenthesised already (not ``b**e``)."""
        return exp in (-1, sympy.Rational(1, 2), sympy.Rational(-1, 2)) or (exp.is_Integer and 2 <= int(exp) <= 4)

    def _operand(self, expr: sympy.Expr) -> str:
        """``expr`` printed as one operand: a name, an array read, a call or a non-negative number
        as it is, anything else in parentheses."""
        text = self._print(expr)
        atomic = expr in self.names or expr.is_Symbol or isinstance(expr, sympy.Indexed | sympy.Function) or (
            expr.is_Number and expr >= 0) or (isinstance(expr, sympy.Pow) and self._self_contained(expr.exp))
        return text if atomic else f"({text})"

    def _argument(self, expr: sympy.Expr) -> str:
        """``expr`` printed as a call's argument: without the parentheses a conditional or a
        sigmoid carries around itself (``math.tanh(a if a > b ... else b)``)."""
        return _unwrap(self._print(expr))

    def _print_Max(self, expr: sympy.Max) -> str:
        return self._nest(">", expr.args)

    def _print_Min(self, expr: sympy.Min) -> str:
        return self._nest("<", expr.args)

    def _nest(self, op: str, args) -> str:
        """NaN-propagating max/min like NumPy's ``maximum``/``minimum`` (and the reference
        backend): ``(a if a > b or a != a else b)`` is NaN when either is NaN. Python's and
        Numba's ``max(a, b)`` return ``a`` for a NaN ``b``; a clip would turn NaN into a bound.
        Each argument is printed twice or three times: callers pass simple ones
        (:func:`atomic_minmax`), and LLVM turns the conditional into selects that vectorize."""
        text = self._print(args[-1])
        for arg in reversed(args[:-1]):
            a = self._print(arg)
            if arg.is_Number:  # never NaN; ``x < 0.0`` is ``0.0 > x`` for every float, NaN too
                text = f"({a} if {text} {FLIPPED[op]} {a} else {text})"
            else:
                text = f"({a} if {a} {op} {text} or {a} != {a} else {text})"
        return text

    def _print_Abs(self, expr: sympy.Abs) -> str:
        return f"abs({self._argument(expr.args[0])})"

    def _select(self, op: str, expr) -> str:
        a, b = (self._operand(arg) for arg in expr.args)
        if expr.args[0].is_Number:  # ``x < 0.0``, not ``0.0 > x``: the same test, read the usual way
            a, b, op = b, a, {">": "<", ">=": "<="}[op]
        return f"({self._literal(1.0)} if {a} {op} {b} else {self._literal(0.0)})"

    def _print_ge(self, expr) -> str:  # cellgen.ir.adjoint.ge: a gradient's selector
        return self._select(">=", expr)

    def _print_gt(self, expr) -> str:
        return self._select(">", expr)

    # -- functions ---------------------------------------------------------------------
    def _tanh(self, arg: str) -> str:
        return f"{self.fast_tanh}({arg})" if self.fast_tanh else f"math.tanh({arg})"

    def _print_tanh(self, expr: sympy.tanh) -> str:
        return self._tanh(self._argument(expr.args[0]))

    def _print_sigmoid(self, expr: sigmoid) -> str:
        # 1/(1+exp(-x)) == 0.5*tanh(x/2) + 0.5: no exp, so no overflow for any x.
        half = self._literal(0.5)
        return f"({half} * {self._tanh(f'{half} * {self._operand(expr.args[0])}')} + {half})"

    def _print_exp(self, expr: sympy.exp) -> str:
        return f"math.exp({self._argument(expr.args[0])})"

    def _print_log(self, expr: sympy.log) -> str:
        return f"math.log({self._argument(expr.args[0])})"

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return expr.name


#: A comparison with its operands swapped.
FLIPPED = {">": "<", "<": ">"}


def _unwrap(text: str) -> str:
    """``text`` without one pair of parentheses around all of it (``(a + b)`` -> ``a + b``, but
    ``(a)*(b)`` stays)."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for k, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[1:-1] if k == len(text) - 1 else text
    return text


def _simple(expr: sympy.Expr) -> bool:
    """An argument printed more than once at no cost: a name, a number, an array read, or -name."""
    if expr.is_Atom or isinstance(expr, sympy.Indexed):
        return True
    return isinstance(expr, sympy.Mul) and len(expr.args) == 2 and expr.args[0] == -1 and _simple(expr.args[1])


def atomic_minmax(temps, values, make_symbol) -> tuple[list[tuple[sympy.Symbol, sympy.Expr]], list[sympy.Expr]]:
    """Give every non-simple argument of a Max/Min its own temporary, so that the NaN-propagating
    conditional of :meth:`NumbaPrinter._nest` evaluates nothing twice.

    ``temps`` are (symbol, expr) assignments in order, ``values`` the expressions after them;
    returns the new assignments (extra ones just before their user) and values.

    >>> x, y = sympy.symbols("x y")
    >>> names = iter(sympy.symbols("m0:9"))
    >>> atomic_minmax([], [sympy.Max(sympy.tanh(x), y)], lambda: next(names))
    ([(m0, tanh(x))], [Max(m0, y)])
    """
    out: list[tuple[sympy.Symbol, sympy.Expr]] = []

    def visit(expr: sympy.Expr) -> sympy.Expr:
        if expr.is_Atom or isinstance(expr, sympy.Indexed):
            return expr
        args = [visit(a) for a in expr.args]
        if isinstance(expr, sympy.Max | sympy.Min):
            simple = []
            for a in args:
                if not _simple(a):
                    sym = make_symbol()
                    out.append((sym, a))
                    a = sym
                simple.append(a)
            return expr.func(*simple, evaluate=False)
        return expr.func(*args) if tuple(args) != expr.args else expr

    for sym, expr in temps:
        out.append((sym, visit(sympy.sympify(expr))))
    return out, [visit(sympy.sympify(v)) for v in values]


class NumPyVectorPrinter(NamedPrinter, NumPyPrinter):
    """Whole-batch NumPy expressions for the reference backend; spec names get ``v_``."""

    def __init__(self) -> None:
        super().__init__({"fully_qualified_modules": False})

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return f"v_{expr.name}"

    def _module_format(self, fqn: str, register: bool = True) -> str:
        return fqn.replace("numpy.", "np.")

    def _print_call(self, expr) -> str:
        """``np.tanh(x)``...: each argument without the parentheses it may carry around itself."""
        known = self.known_functions[expr.__class__.__name__]
        return f"{self._module_format(known)}({', '.join(_unwrap(self._print(a)) for a in expr.args)})"

    _print_tanh = _print_exp = _print_log = _print_call

    def _print_sigmoid(self, expr: sigmoid) -> str:
        arg = expr.args[0]
        text = self._print(arg)
        if not (arg.is_Symbol or arg in self.names or isinstance(arg, sympy.Function)):
            text = f"({text})"
        return f"(0.5 * np.tanh(0.5 * {text}) + 0.5)"

    def _argument(self, expr: sympy.Expr) -> str:
        """``expr`` printed as a call's argument: without the parentheses a conditional or a
        sigmoid carries around itself (``math.tanh(a if a > b ... else b)``)."""
        return _unwrap(self._print(expr))

    def _print_Max(self, expr: sympy.Max) -> str:
        text = self._print(expr.args[-1])
        for arg in reversed(expr.args[:-1]):
            text = f"np.maximum({self._print(arg)}, {text})"
        return text

    def _print_Min(self, expr: sympy.Min) -> str:
        text = self._print(expr.args[-1])
        for arg in reversed(expr.args[:-1]):
            text = f"np.minimum({self._print(arg)}, {text})"
        return text

    def _print_Infinity(self, expr) -> str:
        return "np.inf"

    def _where(self, op: str, expr) -> str:
        a, b = (self._print(arg) for arg in expr.args)
        if expr.args[0].is_Number:  # ``x < 0``, not ``0 > x``
            a, b, op = b, a, {">": "<", ">=": "<="}[op]
        return f"np.where({a} {op} {b}, 1.0, 0.0)"

    def _print_ge(self, expr) -> str:  # cellgen.ir.adjoint.ge: 1.0 where a >= b
        return self._where(">=", expr)

    def _print_gt(self, expr) -> str:
        return self._where(">", expr)

    def _print_NegativeInfinity(self, expr) -> str:
        return "-np.inf"
