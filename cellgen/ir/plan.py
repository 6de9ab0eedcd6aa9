"""The fused plan (the compiler's IR): frozen dataclasses, expressions stay SymPy.

One time step of a cell runs as::

    [prologue epilogue 0]  GEMM 0  epilogue 1  GEMM 1  epilogue 2 ...

after one hoisted GEMM over all T*B rows. Epilogue expressions read and write
arrays through ``sympy.Indexed`` objects whose single index is the column; the
batch row is implicit for *batched* arrays (``pre[b, 2*num_units + j]``) and
absent for per-unit ones (``w_f_diag[j]``). ``UNIT`` (``j``) is the unit index
of the loop an expression lives in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import sympy

from cellgen.frontend.spec import CellSpec

#: The unit (column) index of an epilogue loop.
UNIT = sympy.Symbol("j", integer=True, nonnegative=True)

#: Kernel array names: hoisted pre-activations at t and t-1, the input at t and t-1, the output.
PRE, PRE_PREV, X, X_PREV, OUT = "pre", "pre_prev", "x", "x_prev", "out"


# -- the generated code's namespaces ----------------------------------------------------------
# Every name a spec declares lives in generated code under a prefix of its kind, and no name of
# the generator's own (``b``, ``j``, ``t``, ``out``, ``lengths``, ``np``, ``pre_t``, temporaries
# ``sig_f``, ``new_c``... of cellgen.codegen.names) starts with one of these prefixes: a spec name can never shadow a
# kernel's variable, collide with an argument or with a name of another kind. The prefixes are
# prefix-free (``s_`` / ``sn_`` differ in their second character), so the kinds cannot collide
# with each other either; within a kind the names are the spec's (already unique) names.
STATE_PREFIX, NEW_STATE_PREFIX, PARAM_PREFIX, HYPER_PREFIX, SIZE_PREFIX = "s_", "sn_", "p_", "hy_", "n_"
#: Arrays a time loop saves per step for another loop (TimeLoop.saved): ``sv_<name>[t, b, j]``.
SAVED_PREFIX = "sv_"


def state_array(name: str) -> str:
    """The kernel array holding a state's value before the step."""
    return f"{STATE_PREFIX}{name}"


def new_state_array(name: str) -> str:
    """The kernel array receiving a state's value after the step (a double buffer)."""
    return f"{NEW_STATE_PREFIX}{name}"


def saved_array(name: str) -> str:
    """The [T, B, width] array a time loop saves a value into every step (``TimeLoop.saved``)."""
    return f"{SAVED_PREFIX}{name}"


def param_array(name: str) -> str:
    """The readable kernel array name of a parameter (``w_f_diag``, ``gates/bias`` -> ``p_gates_bias``).

    Not injective (``rec_bias`` and ``rec/bias``): kernels use :func:`param_arrays`.
    """
    return PARAM_PREFIX + "".join(ch if ch.isalnum() else "_" for ch in name)


def param_arrays(names) -> dict[str, str]:
    """Each parameter name -> its kernel array, distinct for distinct names: the readable
    :func:`param_array`, with ``_2``, ``_3``... appended to a later name that would collide.

    >>> param_arrays(["rec_bias", "rec/bias", "w"])
    {'rec_bias': 'p_rec_bias', 'rec/bias': 'p_rec_bias_2', 'w': 'p_w'}
    """
    arrays: dict[str, str] = {}
    taken: set[str] = set()
    for name in dict.fromkeys(names):
        base = candidate = param_array(name)
        suffix = 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        arrays[name] = candidate
        taken.add(candidate)
    return arrays


def hyper_name(name: str) -> str:
    """The kernel variable of a hyperparameter (``forget_bias`` -> ``hy_forget_bias``)."""
    return f"{HYPER_PREFIX}{name}"


def size_name(name: str) -> str:
    """The kernel variable of a size (``num_units`` -> ``n_num_units``)."""
    return f"{SIZE_PREFIX}{name}"


class Direction(str, Enum):
    """Which way a plan's time loop runs: the forward pass, or the backward pass through time."""

    FORWARD = "forward"  # t = 0 .. T-1
    REVERSE = "reverse"  # t = T-1 .. 0 (backpropagation through time)


class GemmKind(str, Enum):
    """What a GEMM of a plan multiplies. A forward plan has only OPERAND_W; a backward plan (the
    training issue) is the same vocabulary with the other two kinds (docs/architecture.md)."""

    OPERAND_W = "operand @ W"  # forward: the hoisted projection and each recurrent GEMM
    DGATES_WT = "d_gates @ W^T"  # backward: the gradient of a GEMM's operands (per step, or over all T*B)
    WEIGHT_GRAD = "operands^T @ d_gates"  # backward: a weight's gradient, ONE GEMM over all T*B rows


@dataclass(frozen=True)
class TimeLoop:
    """The time loop a plan runs in, and what its scheduling may assume.

    ``in_place``: a state's new value may overwrite its old one when nothing later in the step
    reads the old value (:func:`cellgen.ir.passes.update_in_place`); a loop whose old states
    another loop needs (a forward that a backward replays without saving states) sets it False and
    every recurrent state stays double-buffered. ``saved``: the values the loop stores every step
    for another loop (name and width: a gate, a state or an activation of the training issue's
    saving forward), into ``[T, B, width]`` arrays named :func:`saved_array`.
    """

    direction: Direction = Direction.FORWARD
    in_place: bool = True
    saved: tuple[tuple[str, sympy.Expr], ...] = ()


@dataclass(frozen=True)
class WeightBlock:
    """``packed[dest_row:dest_row+rows, dest_col:dest_col+width] += params[kernel][row_start:row_start+rows]``."""

    kernel: str
    row_start: sympy.Expr
    rows: sympy.Expr
    dest_row: sympy.Expr
    dest_col: sympy.Expr
    width: sympy.Expr
    delayed: bool = False  # hoisted block whose operand is x_{t-1}: read one step late


@dataclass(frozen=True)
class BiasBlock:
    """``packed_bias[dest_col:dest_col+width] = params[bias]``."""

    bias: str
    dest_col: sympy.Expr
    width: sympy.Expr


@dataclass(frozen=True)
class HoistedGemm:
    """ONE GEMM over all T*B input rows: ``pre = x @ weight + bias``, [T, B, width].

    ``delayed_linears`` read their columns one step late (``pre_prev``): the part of a
    linear whose operand is a delay state (x_{t-1}).
    """

    rows: sympy.Expr
    width: sympy.Expr
    blocks: tuple[WeightBlock, ...]
    biases: tuple[BiasBlock, ...]
    direct_linears: tuple[str, ...]
    delayed_linears: tuple[str, ...]
    kind: GemmKind = GemmKind.OPERAND_W

    @property
    def delayed(self) -> bool:
        return bool(self.delayed_linears)


@dataclass(frozen=True)
class Operand:
    """One operand of a recurrent GEMM: a state read in place, or a buffer an epilogue fills."""

    label: str
    expr: sympy.Expr
    size: sympy.Expr
    offset: sympy.Expr  # row offset in the stage's operand buffer


@dataclass(frozen=True)
class RecurrentGemm:
    """``rec{stage} = operand @ weight`` once per step; operands of all its linears concatenated."""

    stage: int
    operands: tuple[Operand, ...]
    rows: sympy.Expr
    width: sympy.Expr
    blocks: tuple[WeightBlock, ...]
    linears: tuple[str, ...]
    direct_state: str | None  # the state read in place when it is the only, plain operand
    kind: GemmKind = GemmKind.OPERAND_W

    @property
    def result(self) -> str:
        return f"rec{self.stage}"

    @property
    def operand_buffer(self) -> str | None:
        return None if self.direct_state is not None else f"opnd{self.stage}"


@dataclass(frozen=True)
class Store:
    """``target = value`` for active rows; ``target = masked`` past the sequence length (None: skip)."""

    target: sympy.Indexed
    value: sympy.Expr
    masked: sympy.Expr | None


@dataclass(frozen=True)
class Loop:
    """One elementwise loop over ``domain`` units for every batch row.

    At each (row, unit) a loop is a *parallel assignment*: every temp and every store's value
    is read from the arrays as they were before the loop, then all stores are made. A store in
    place (``s_h[j] = ...``) is therefore never read back as the old value by a later store of
    the same loop; printers keep that order (read all values, then store).
    """

    domain: sympy.Expr
    temps: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    stores: tuple[Store, ...]

    @property
    def ops(self) -> int:
        """Arithmetic operations per unit (SymPy's count_ops)."""
        exprs = [e for _, e in self.temps] + [s.value for s in self.stores]
        return int(sum(sympy.count_ops(e) for e in exprs))


@dataclass(frozen=True)
class Epilogue:
    """The elementwise work between two GEMMs; ``index`` k runs after GEMM k-1."""

    index: int
    loops: tuple[Loop, ...]


@dataclass(frozen=True)
class FusedPlan:
    """Everything the printers and templates need to emit one cell's kernels."""

    spec: CellSpec
    hoisted: HoistedGemm | None
    gemms: tuple[RecurrentGemm, ...]
    epilogues: tuple[Epilogue, ...]
    recurrent_states: tuple[str, ...]  # double-buffered inside the kernel
    delay_states: tuple[str, ...]  # x_{t-1}: derived from the inputs by the driver
    batched_arrays: tuple[str, ...]
    unit_params: tuple[str, ...]  # per-unit parameter vectors the epilogues read
    epilogue_biases: tuple[str, ...]  # biases of linears with no hoisted part
    uses_x: bool
    uses_x_prev: bool
    output_size: sympy.Expr
    param_arrays: dict[str, str]  # every per-unit parameter's and bias's kernel array (param_arrays)
    double_buffered: tuple[str, ...] = ()  # states stored into their sn_ array, swapped after each step
    time_loop: TimeLoop = field(default_factory=TimeLoop)
    #: each live gate (spec order) -> the array reads that give its value at unit ``UNIT`` (``analysis.loads``):
    #: how the printers name a temporary after the gates it computes
    gate_loads: tuple[tuple[str, sympy.Expr], ...] = ()

    @property
    def scan_only(self) -> bool:
        """No recurrent GEMM: the step is a pure elementwise scan (QRNN)."""
        return not self.gemms

    def schedule(self) -> list[tuple[str, int]]:
        """The per-step order: ('epilogue', k) and ('gemm', s) items."""
        steps: list[tuple[str, int]] = []
        by_index = {e.index: e for e in self.epilogues}
        for s in range(len(self.gemms) + 1):
            if s in by_index:
                steps.append(("epilogue", s))
            if s < len(self.gemms):
                steps.append(("gemm", s))
        return steps
