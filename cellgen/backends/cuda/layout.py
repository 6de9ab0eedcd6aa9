"""Stage 4c, facts (FusedPlan -> CudaLayout): the CUDA launch layout, decided in Python from the plan.

Every GPU fact lives here, as frozen dataclasses: the thread block and the reduction tile, which
recurrent GEMM fuses its epilogue and how its gates are interleaved (:class:`StageLayout`), which
states the GPU double-buffers, and per kernel (:class:`CudaKernel`) what it runs, its arguments
(:class:`KernelArg`, found in the IR: the SymPy expressions' ``Indexed`` bases and free symbols
mapped to kernel arrays), its block and grid and the buffers of a call. ``context.py`` only prints
a :class:`CudaLayout`; the template only prints structure. The hoisted GEMM is the runtime's
(:mod:`cellgen.backends.cuda.gemm`): a layout says only whether it runs.

Kernels (docs/gpu.md):

* ``stage{s}``: per step and recurrent GEMM ``s``, ONE kernel that runs the GEMM on a
  gate-interleaved weight (the G gate columns of unit j adjacent) so that a thread owns
  unit j of one batch row with all G accumulators, and applies epilogue ``s + 1`` straight
  from them, sequence-length masking included (*fused*);
* ``scan``: a scan-only cell (QRNN) is one kernel, a thread per (row, unit), time loop inside;
* ``epilogue{k}``: an elementwise kernel, only for epilogue 0 (filling a stage-0 operand
  buffer) and for an epilogue that cannot be fused (its loops have another domain than the
  GEMM's gates, or the GEMM's gates differ in size). No shipped spec needs one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from cellgen.codegen.uses import loop_exprs
from cellgen.ir.plan import (
    OUT,
    PRE,
    PRE_PREV,
    UNIT,
    X,
    X_PREV,
    Epilogue,
    FusedPlan,
    Loop,
    RecurrentGemm,
    Store,
    hyper_name,
    new_state_array,
    saved_array,
    size_name,
    state_array,
)

#: Threads of a step/scan/elementwise block: one warp along units, BLOCK_ROWS batch rows.
BLOCK_UNITS, BLOCK_ROWS = 32, 4
#: Batch sizes up to ALL_ROWS run the per-step kernels as ``<name>_all``: blocks of BLOCK_UNITS x ALL_ROWS
#: threads, one block covering every batch row of its units, so that a step reads each weight column
#: from L2 once instead of ceil(B / BLOCK_ROWS) times (docs/gpu.md, "One block over all rows").
ALL_ROWS = 16
#: The persistent kernel's block: a warp along units, PERSISTENT_ROWS batch rows at a time (its rows loop).
PERSISTENT_ROWS = 4
#: With half storage the persistent kernel's GEMMs run on tensor cores (``mma.sync`` m16n8k16,
#: docs/gpu.md "The recurrent GEMM on tensor cores"): a row group is then the MMA's M = MMA_ROWS rows
#: (B <= 16 in one group), each warp of the block taking every (warps)-th tile of MMA_N columns; the
#: accumulators go through a shared [MMA_ROWS, columns + MMA_PAD] tile to the epilogue's threads
#: (the pad: consecutive rows land 8 banks apart, a fragment store's 8 rows on 4 offsets: 2-way conflicts).
MMA_ROWS, MMA_N, MMA_PAD = 16, 8, 8
#: Reduction tile of a stage kernel; equal to BLOCK_UNITS so each thread loads one operand element.
TILE_K = BLOCK_UNITS
#: The tensor-core persistent kernel's K tile: MMA_TILE_K rows of the operand and of the weight slices a
#: round (each round: one block barrier after the operand tile's stores, one after its MMAs, the next
#: tile's loads in flight meanwhile). Twice the stage kernels' TILE_K: half the rounds (and L2 round
#: trips a step) for 8 more registers of prefetched operand a thread.
MMA_TILE_K = 2 * TILE_K
#: The operand tile in shared memory: MMA_ROWS rows of MMA_K_WORDS 32-bit words (two K-adjacent 16-bit
#: elements each), rows MMA_A_STRIDE words apart (4 banks on, mod 32), so the 8 rows one fragment read
#: touches start on 8 distinct groups of 4 banks (no conflicts).
MMA_K_WORDS = MMA_TILE_K // 2
MMA_A_STRIDE = MMA_K_WORDS + 4
#: Threads of a warp, and shared-memory banks (4-byte words).
WARP, BANKS = 32, 32
#: The batch size of a call, as the host code names it (the y extent of every grid).
BATCH = sympy.Symbol("B", integer=True, nonnegative=True)
#: Plan arrays a kernel reads through a per-step view -> the host/kernel arguments behind the view.
VIEW_ARGS = {PRE: ("pre",), PRE_PREV: ("pre", "pre0"), X: ("xs",), X_PREV: ("xs", "x0"), OUT: ("out",)}


# -- the dataclasses ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StageLayout:
    """How recurrent GEMM ``stage`` runs on the GPU.

    ``gates`` columns of each of ``units`` units, packed gate-interleaved (column
    ``u * gates + g`` of the packed weight is column ``g * units + u`` of the plan's).
    ``fused``: epilogue ``stage + 1`` runs in the same kernel from the accumulators.
    ``stored``: accumulators written to ``rec{stage}`` for later epilogues.
    An unfused stage has ``gates == 1`` and ``units == width`` (one column per thread).
    """

    stage: int
    gates: int
    units: sympy.Expr
    fused: bool
    stored: tuple[int, ...]

    @property
    def interleaved(self) -> bool:
        return self.gates > 1


@dataclass(frozen=True)
class KernelArg:
    """One kernel argument: its name (the same variable on the host) and kind.

    Kinds: ``int``, ``real`` (the kernel's dtype), ``lengths`` (int64 [B]), ``array1``..``array3``.
    """

    name: str
    kind: str


@dataclass(frozen=True)
class StageGemm:
    """The recurrent GEMM of a stage kernel: ``result[B, width] = operand[B, rows] @ weight``.

    A block of ``block`` threads covers ``block[0]`` units of ``block[1]`` batch rows and owns the
    ``columns = block[0] * gates`` contiguous (gate-interleaved) weight columns of its units; per
    K tile of ``tile_k`` rows each thread loads one operand element and the block loads
    ``weight_tile`` weight elements: thread (tx, ty) the column tx of each ``block[0]``-column chunk
    of the tile rows ty, ty + block[1], ... (``rows_per_thread`` rows x ``gates`` chunks, all loaded
    into registers before any is stored; a warp reads ``block[0]`` consecutive columns). The
    next tile's loads are issued before the current tile's FMAs.

    Shared memory holds the tile gate-major, each gate's units rotated by ``swizzle * gate``
    (``_sw[k, g * block[0] + (u + swizzle * g) % block[0]]``) so that both a warp's stores (32
    consecutive interleaved columns: several units and gates) and its FMA reads (32 units of one
    gate) hit 32 distinct banks.
    """

    stage: int
    operand: str  # the kernel array of the operand: a state read in place, or an operand buffer
    weight: str
    result: str
    rows: sympy.Expr  # K
    width: sympy.Expr  # N = gates * units
    units: sympy.Expr  # the units a thread's j ranges over (j < units)
    gates: int  # accumulators per thread: unit j's gate columns
    stored: tuple[int, ...]  # the gates whose accumulators are written to ``result``
    block: tuple[int, int]
    tile_k: int

    def __post_init__(self) -> None:
        if self.tile_k != self.block[0]:  # each thread of a row loads one operand element per K tile
            raise ValueError(f"stage {self.stage}: K tile {self.tile_k} != {self.block[0]} threads along units")
        if self.block[0] % WARP or self.tile_k % self.block[1]:  # warps along units; whole rows per thread
            raise ValueError(f"stage {self.stage}: block {self.block} needs a multiple of {WARP} units and "
                             f"K tile {self.tile_k} a multiple of {self.block[1]} rows")

    @property
    def interleaved(self) -> bool:
        """The weight's columns are gate-interleaved: shared memory stores them gate-major."""
        return self.gates > 1

    @property
    def columns(self) -> int:
        return self.block[0] * self.gates

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1]

    @property
    def weight_tile(self) -> int:
        return self.tile_k * self.columns

    @property
    def acc_columns(self) -> tuple[int, ...]:
        """Per gate, the first shared-memory column of its block (``_sw[k, g * block[0] + tx]``)."""
        return tuple(g * self.block[0] for g in range(self.gates))

    @property
    def rows_per_thread(self) -> int:
        """Tile rows a thread loads (each in ``gates`` chunks): ``tile_k / block[1]``."""
        return self.tile_k // self.block[1]

    @property
    def per_thread(self) -> int:
        """Weight elements a thread holds in registers per tile (``weight_tile / threads``)."""
        return self.rows_per_thread * self.gates

    def swizzle(self, itemsize: int) -> int:
        """The rotation per gate of the shared tile for elements of ``itemsize`` bytes (see the class)."""
        return bank_swizzle(self.gates, self.block[0], itemsize) if self.interleaved else 0


def store_conflicts(gates: int, units: int, swizzle: int, itemsize: int = 4) -> int:
    """The worst bank conflict (accesses per bank in one wavefront) of a warp's stores of interleaved
    columns: each wavefront serves ``128 / itemsize`` lanes, column c at unit ``c // gates``, gate ``c % gates``."""
    lanes = WARP * 4 // max(itemsize, 4)
    worst = 1
    for start in range(0, gates * units, lanes):
        cols = [(c % gates) * units + (c // gates + swizzle * (c % gates)) % units for c in range(start, start + lanes)]
        banks = [(col * itemsize // 4) % BANKS for col in cols]
        worst = max(worst, max(banks.count(b) for b in banks))
    return worst


def bank_swizzle(gates: int, units: int, itemsize: int = 4) -> int:
    """The smallest rotation per gate with the fewest store conflicts (none where one exists).

    A warp's FMA reads (its units of one gate) are conflict-free for any rotation. For float32 and
    odd G the rotation is G's inverse modulo 32 (the bank is then ``swizzle * column``), for
    G = 2^k it is 32 / G; float64 (16 lanes a wavefront) needs half of that for even G.

    >>> [bank_swizzle(g, 32) for g in (1, 2, 3, 4)], [bank_swizzle(g, 32, 8) for g in (2, 3, 4)]
    ([0, 16, 11, 8], [8, 11, 4])
    """
    return min(range(units), key=lambda s: (store_conflicts(gates, units, s, itemsize), s))


@dataclass(frozen=True)
class StateCopy:
    """After each step of a scan: ``old[b, j] = new[b, j]`` for ``j < domain`` (a thread's double buffer)."""

    old: str
    new: str
    domain: sympy.Expr


@dataclass(frozen=True)
class CudaKernel:
    """One generated kernel: what it runs at each (row b, unit j), its arguments and its launch.

    ``grid`` is the extent its threads cover along x (units: the largest of ``grid[0]``) and y
    (batch rows), in blocks of ``block``. ``per_step``: launched once per time step by the host
    (False: the scan, whose time loop runs inside). ``gemm``: the recurrent GEMM of a stage
    kernel (None: elementwise). ``loops``: the epilogue loops it runs, each ``guarded`` by
    ``j < domain`` (a stage kernel guards ``j < units`` once). ``views``: the plan arrays it
    reads through per-step views. ``masked``: rows past their length store something.
    """

    name: str
    args: tuple[KernelArg, ...]
    block: tuple[int, int]
    grid: tuple[tuple[sympy.Expr, ...], sympy.Expr]
    per_step: bool
    gemm: StageGemm | None
    epilogue: int | None
    loops: tuple[Loop, ...]
    guarded: bool
    views: tuple[str, ...]
    masked: bool
    copies: tuple[StateCopy, ...] = ()

    def __post_init__(self) -> None:
        if self.gemm is not None and self.gemm.block != self.block:
            raise ValueError(f"{self.name}: its GEMM's block {self.gemm.block} is not the kernel's {self.block}")

    @property
    def stage(self) -> bool:
        return self.gemm is not None

    @property
    def runs_epilogue(self) -> bool:
        return bool(self.loops)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)


@dataclass(frozen=True)
class PersistentKernel:
    """The whole time loop in one cooperative launch (docs/gpu.md, "The persistent kernel").

    The grid splits each stage's (chunk of ``block[0]`` units, group of ``block[1]`` rows) pairs
    over its blocks (:func:`cellgen.backends.cuda.steps.grid_split`); a block keeps its chunks' weight
    columns (all K rows, zero-padded to a multiple of the K tile) in dynamic shared memory for all T
    steps; per step it runs each of ``stages`` (the per-step stage kernels, same printed epilogues)
    over its pairs, with a grid-wide barrier after each stage (where the per-step launches had a
    kernel boundary), and swaps ``double_buffered`` after each step as the host does between
    launches. Only where every per-step kernel is a fused
    stage kernel (no elementwise epilogue kernel); :mod:`cellgen.backends.cuda.steps` decides at
    run time whether the slices fit on chip.
    """

    name: str
    args: tuple[KernelArg, ...]
    block: tuple[int, int]
    stages: tuple[CudaKernel, ...]
    double_buffered: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.stages or any(not k.stage or not k.per_step for k in self.stages):
            raise ValueError(f"{self.name}: runs per-step stage kernels only")
        if self.block[0] != BLOCK_UNITS or any(k.gemm.tile_k != self.block[0] for k in self.stages):
            raise ValueError(f"{self.name}: a warp of {BLOCK_UNITS} units loads one K tile row")

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def warps(self) -> int:
        return self.block[0] * self.block[1] // WARP

    def mma_tiles(self, stage: CudaKernel) -> int:
        """Tensor-core column tiles (MMA_N columns) per warp of ``stage``'s chunk (all gates of its units)."""
        tiles, left = divmod(stage.gemm.columns, MMA_N * self.warps)
        if left:
            raise ValueError(f"{self.name}: {stage.gemm.columns} columns a chunk do not split into "
                             f"{self.warps} warps of {MMA_N}-column tiles")
        return tiles

    def group_rows(self, itemsize: int) -> int:
        """Batch rows of a row group for storage elements of ``itemsize`` bytes (:func:`group_rows`)."""
        return group_rows(itemsize, self.block[1])

    def static_shared(self, itemsize: int) -> int:
        """Static shared memory a block declares besides the dynamic weight slices: the operand tile, or with
        half storage the two operand word tiles and the accumulator tile (what the runtime subtracts from
        the opt-in before fitting the slices)."""
        if itemsize == 2:
            return 4 * MMA_ROWS * (2 * MMA_A_STRIDE + self.mma_width)
        return self.block[0] * self.block[1] * itemsize

    @property
    def mma_width(self) -> int:
        """Columns of the accumulator tile the tensor-core stages share (the widest chunk, padded)."""
        return max(k.gemm.columns for k in self.stages) + MMA_PAD


def slice_tile_k(itemsize: int) -> int:
    """K rows the persistent kernel's weight slices are padded to: its K tile (:data:`MMA_TILE_K` with half
    storage, ``itemsize`` 2: on tensor cores; else :data:`TILE_K`)."""
    return MMA_TILE_K if itemsize == 2 else TILE_K


def group_rows(itemsize: int, block_rows: int) -> int:
    """Batch rows of a persistent kernel's row group: its block's ``block_rows``, or with half storage
    (``itemsize`` 2: its GEMMs on tensor cores) the MMA's M, :data:`MMA_ROWS`."""
    return MMA_ROWS if itemsize == 2 else block_rows


@dataclass(frozen=True)
class Buffer:
    """A per-call device buffer ``[B, width]``: a GEMM result a later epilogue reads, or a stage operand."""

    name: str
    width: sympy.Expr


@dataclass(frozen=True)
class CudaLayout:
    """Everything the CUDA backend decides for one plan; ``context.py`` prints it.

    ``plan`` is the plan after the GPU's double-buffering (what the kernels print).
    ``kernels`` in launch order: per step (``scan`` False: the host loops over t) or the one scan.
    ``hoisted``: the runtime's hoisted GEMM runs first (``delayed``: once more on the initial
    x_{t-1}, giving ``pre0``). ``recurrent_states`` and ``delay_state`` index the call's states.
    """

    plan: FusedPlan
    block: tuple[int, int]
    tile_k: int
    stages: tuple[StageLayout, ...]
    double_buffered: tuple[str, ...]
    kernels: tuple[CudaKernel, ...]
    all_rows: tuple[CudaKernel, ...]  # per per-step kernel, its variant over all rows (B <= all_rows_max)
    all_rows_max: int
    persistent: PersistentKernel | None
    scan: bool
    hoisted: bool
    delayed: bool
    buffers: tuple[Buffer, ...]
    recurrent_states: tuple[str, ...]
    delay_state: str | None
    unit_params: tuple[str, ...]  # per-unit parameter vectors (and epilogue biases) uploaded as they are

    @property
    def weights(self) -> tuple[str, ...]:
        """Per recurrent GEMM, the kernel array of its weight (``weights.recurrent[s]`` on the device)."""
        return tuple(weight_array(s.stage) for s in self.stages)

    @property
    def gates(self) -> tuple[int, ...]:
        """Per recurrent GEMM: gates interleaved per unit in its packed weight (1: columns as packed)."""
        return tuple(s.gates for s in self.stages)

    def kernel(self, name: str) -> CudaKernel:
        return next(k for k in self.kernels if k.name == name)


def weight_array(stage: int) -> str:
    """The kernel array of recurrent GEMM ``stage``'s packed (gate-interleaved) weight."""
    return f"w_rec{stage}"


# -- facts on the plan ---------------------------------------------------------------------------
def reads(loop: Loop, array: str) -> list[sympy.Expr]:
    """The column indices at which ``loop`` reads ``array``."""
    return [i.indices[0] for e in loop_exprs(loop) for i in e.atoms(sympy.Indexed) if str(i.base) == array]


def gate_of(index: sympy.Expr, units: sympy.Expr, gates: int) -> int | None:
    """``k`` when ``index == k * units + j`` with ``0 <= k < gates``; else None.

    >>> n = sympy.Symbol("num_units")
    >>> gate_of(UNIT + 2 * n, n, 4), gate_of(UNIT + 1, n, 4)
    (2, None)
    """
    k = sympy.simplify((index - UNIT) / units)
    if k.is_Integer and 0 <= int(k) < gates:
        return int(k)
    return None


def gate_layout(plan: FusedPlan, gemm: RecurrentGemm) -> tuple[int, sympy.Expr] | None:
    """(gates G, units D) when every gate of the GEMM's linears has the same size D; else None."""
    linears = [lin for lin in plan.spec.linears if lin.kernel in gemm.linears]
    sizes = {lin.gate_size for lin in linears}
    if len(sizes) != 1:
        return None
    units = sizes.pop()
    gates = sum(len(lin.gates) for lin in linears)
    if sympy.simplify(gates * units - gemm.width) != 0:
        return None
    return gates, units


def stage_layouts(plan: FusedPlan) -> tuple[StageLayout, ...]:
    """One :class:`StageLayout` per recurrent GEMM: fuse its epilogue where the gates allow."""
    by_index = {e.index: e for e in plan.epilogues}
    layouts = []
    for gemm in plan.gemms:
        result, following = gemm.result, by_index.get(gemm.stage + 1)
        found = gate_layout(plan, gemm)
        fused = found is not None and (following is None or all(
            loop.domain == found[1] and all(gate_of(i, found[1], found[0]) is not None for i in reads(loop, result))
            for loop in following.loops))
        later = [(loop.domain, i) for e in plan.epilogues if e.index > gemm.stage + 1 or not fused
                 for loop in e.loops for i in reads(loop, result)]
        if not fused or found is None:
            layouts.append(StageLayout(gemm.stage, 1, gemm.width, False, (0,) if later else ()))
            continue
        gates, units = found
        ks = {gate_of(i, units, gates) if domain == units else None for domain, i in later}
        stored = tuple(range(gates)) if None in ks else tuple(sorted(ks))
        layouts.append(StageLayout(gemm.stage, gates, units, True, stored))
    return tuple(layouts)


def gpu_double_buffered(plan: FusedPlan, layouts: tuple[StageLayout, ...]) -> tuple[str, ...]:
    """States the GPU double-buffers: the plan's, plus any state a fused kernel both reads whole
    (as its GEMM operand, across all units) and stores: other blocks may still be reading it."""
    names = set(plan.double_buffered)
    by_index = {e.index: e for e in plan.epilogues}
    for gemm, layout in zip(plan.gemms, layouts, strict=True):
        following = by_index.get(gemm.stage + 1)
        if not layout.fused or gemm.direct_state is None or following is None:
            continue
        targets = {str(s.target.base) for loop in following.loops for s in loop.stores}
        if state_array(gemm.direct_state) in targets:
            names.add(gemm.direct_state)
    return tuple(n for n in plan.recurrent_states if n in names)


def double_buffer(plan: FusedPlan, names: tuple[str, ...]) -> FusedPlan:
    """Retarget in-place stores of ``names`` to ``sn_<name>`` (rows past their length copy the old value)."""
    old = {state_array(n): new_state_array(n) for n in names}

    def store(s: Store) -> Store:
        base = str(s.target.base)
        if base not in old:
            return s
        index = s.target.indices[0]
        return Store(sympy.Indexed(sympy.IndexedBase(old[base]), index), s.value, s.target)

    epilogues = tuple(Epilogue(e.index, tuple(dataclasses.replace(loop, stores=tuple(map(store, loop.stores)))
                                              for loop in e.loops)) for e in plan.epilogues)
    batched = tuple(sorted(set(plan.batched_arrays) | {new_state_array(n) for n in names}))
    return dataclasses.replace(plan, epilogues=epilogues, batched_arrays=batched, double_buffered=names)


# -- arguments, from the IR ----------------------------------------------------------------------
def arg_order(plan: FusedPlan) -> tuple[KernelArg, ...]:
    """Every possible kernel argument, in the order kernels take them."""
    spec = plan.spec
    args = [KernelArg("t", "int"), KernelArg("pre", "array3"), KernelArg("pre0", "array2"),
            KernelArg("xs", "array3"), KernelArg("x0", "array2"), KernelArg("lengths", "lengths")]
    args += [KernelArg(weight_array(g.stage), "array2") for g in plan.gemms]
    args += [KernelArg(g.result, "array2") for g in plan.gemms]
    args += [KernelArg(g.operand_buffer, "array2") for g in plan.gemms if g.operand_buffer is not None]
    args += [KernelArg(plan.param_arrays[n], "array1") for n in (*plan.unit_params, *plan.epilogue_biases)]
    args += [KernelArg(hyper_name(h.name), "real") for h in spec.hypers]
    args += [KernelArg(size_name(str(s)), "int") for s in spec.all_sizes]
    args += [KernelArg(state_array(n), "array2") for n in plan.recurrent_states]
    args += [KernelArg(new_state_array(n), "array2") for n in plan.recurrent_states]
    args.append(KernelArg("out", "array3"))
    args += [KernelArg(saved_array(n), "array3") for n, _ in plan.time_loop.saved]  # a training forward's saves
    return tuple(args)


def used(exprs: list[sympy.Expr]) -> set[str]:
    """Argument names an expression list needs: arrays (through their views) and scalars.

    Read off the IR: every ``Indexed`` base is a kernel array (a per-step view names the
    arrays behind it, :data:`VIEW_ARGS`), every free symbol a scalar. Hyperparameters are
    already their kernel variables in the plan (``hy_...``); sizes are the spec's size symbols
    (integer), printed as their kernel variables (``n_...``).
    """
    names: set[str] = set()
    for e in exprs:
        e = sympy.sympify(e)
        for i in e.atoms(sympy.Indexed):
            names.update(VIEW_ARGS.get(str(i.base), (str(i.base),)))
            names.update(sizes_used(*i.indices))
        names.update(size_name(str(s)) if s.is_integer else str(s) for s in e.free_symbols
                     if not isinstance(s, sympy.Indexed) and s != UNIT)
    return names


def loops_used(loops: tuple[Loop, ...]) -> set[str]:
    """:func:`used` over every expression and domain of ``loops``."""
    return used([e for loop in loops for e in loop_exprs(loop)])  # the domain is the first expression


def sizes_used(*exprs: sympy.Expr) -> set[str]:
    """The kernel variables of the sizes in index or size expressions."""
    return {size_name(str(s)) for e in exprs for s in sympy.sympify(e).free_symbols if s != UNIT}


def views(loops: tuple[Loop, ...]) -> tuple[str, ...]:
    """The plan arrays ``loops`` read or write through a per-step view (``pre`` -> ``pre_t``), in a fixed order."""
    arrays = {str(i.base) for loop in loops for e in loop_exprs(loop) for i in e.atoms(sympy.Indexed)}
    return tuple(name for name in VIEW_ARGS if name in arrays)


def masked(loops: tuple[Loop, ...]) -> bool:
    """Some store of ``loops`` writes a value past the sequence length (not just keeps the target)."""
    return any(s.masked is not None and s.masked != s.target for loop in loops for s in loop.stores)


# -- the layout ----------------------------------------------------------------------------------
class _Builder:
    """Makes every kernel of one plan (after the GPU's double-buffering)."""

    def __init__(self, plan: FusedPlan) -> None:
        self.stages = stage_layouts(plan)
        self.double_buffered = gpu_double_buffered(plan, self.stages)
        self.plan = double_buffer(plan, self.double_buffered)
        self.order = arg_order(self.plan)
        self.by_index = {e.index: e for e in self.plan.epilogues}

    def args(self, names: set[str]) -> tuple[KernelArg, ...]:
        return tuple(a for a in self.order if a.name in names)

    def stage(self, gemm: RecurrentGemm, layout: StageLayout) -> CudaKernel:
        """GEMM ``gemm.stage`` (+ its epilogue when fused) as one kernel."""
        runs = layout.fused and gemm.stage + 1 in self.by_index  # the following epilogue, from the accumulators
        loops = self.by_index[gemm.stage + 1].loops if runs else ()
        operand = state_array(gemm.direct_state) if gemm.direct_state else gemm.operand_buffer
        weight = weight_array(gemm.stage)
        names = {"t", "lengths", operand, weight} | loops_used(loops)
        names |= sizes_used(gemm.rows, gemm.width, layout.units)
        if layout.stored:
            names.add(gemm.result)
        else:  # read from the accumulators only
            names.discard(gemm.result)
        block = (BLOCK_UNITS, BLOCK_ROWS)
        spec = StageGemm(gemm.stage, operand, weight, gemm.result, gemm.rows, gemm.width, layout.units,
                         layout.gates, layout.stored, block, TILE_K)
        return CudaKernel(f"stage{gemm.stage}", self.args(names), block, ((layout.units,), BATCH), True, spec,
                          gemm.stage + 1 if loops else None, loops, False, views(loops), masked(loops))

    def elementwise(self, index: int, scan: bool) -> CudaKernel:
        """Epilogue ``index`` as one kernel, a thread per (row, unit): per step, or the whole scan."""
        loops = self.by_index[index].loops
        names = {"lengths"} | loops_used(loops)
        if scan:  # the time loop runs to out.shape[0]
            names = (names - {"t"}) | {"out"}
        else:
            names.add("t")
        copies = []
        if scan:  # a thread's double-buffered states: new -> old after each step
            for name in self.double_buffered:
                domain = next(loop.domain for loop in loops for s in loop.stores
                              if str(s.target.base) == new_state_array(name))
                copies.append(StateCopy(state_array(name), new_state_array(name), domain))
        extents = tuple(dict.fromkeys(loop.domain for loop in loops))
        return CudaKernel("scan" if scan else f"epilogue{index}", self.args(names), (BLOCK_UNITS, BLOCK_ROWS),
                          (extents, BATCH), not scan, None, index, loops, True, views(loops), masked(loops),
                          tuple(copies))

    def kernels(self) -> tuple[CudaKernel, ...]:
        plan = self.plan
        if plan.scan_only:
            return (self.elementwise(0, scan=True),)
        kernels = []
        for kind, index in plan.schedule():
            if kind == "gemm":
                kernels.append(self.stage(plan.gemms[index], self.stages[index]))
            elif index == 0 or not self.stages[index - 1].fused:
                kernels.append(self.elementwise(index, scan=False))
        return tuple(kernels)

    def all_rows(self, kernels: tuple[CudaKernel, ...]) -> tuple[CudaKernel, ...]:
        """Each per-step kernel with a block of ALL_ROWS batch rows (the same code, one row block for B <= ALL_ROWS)."""
        block = (BLOCK_UNITS, ALL_ROWS)
        return tuple(dataclasses.replace(k, name=f"{k.name}_all", block=block,
                                         gemm=k.gemm and dataclasses.replace(k.gemm, block=block))
                     for k in kernels if k.per_step)

    def persistent(self, kernels: tuple[CudaKernel, ...]) -> PersistentKernel | None:
        """The time loop as one kernel, where every per-step kernel is a fused stage kernel (else None)."""
        if self.plan.scan_only or any(not k.stage for k in kernels):
            return None
        block = (BLOCK_UNITS, PERSISTENT_ROWS)
        stages = tuple(dataclasses.replace(k, block=block, gemm=dataclasses.replace(k.gemm, block=block))
                       for k in kernels)
        names = ({a for k in stages for a in k.arg_names} - {"t"}) | {"out"}  # the time loop runs to out.shape[0]
        names |= {new_state_array(n) for n in self.double_buffered} | {state_array(n) for n in self.double_buffered}
        return PersistentKernel("persistent", self.args(names), block, stages, self.double_buffered)

    def buffers(self) -> tuple[Buffer, ...]:
        buffers = []
        for gemm, layout in zip(self.plan.gemms, self.stages, strict=True):
            if layout.stored:
                buffers.append(Buffer(gemm.result, gemm.width))
            if gemm.operand_buffer is not None:
                buffers.append(Buffer(gemm.operand_buffer, gemm.rows))
        return tuple(buffers)


def cuda_layout(plan: FusedPlan) -> CudaLayout:
    """The launch layout of ``plan``'s kernels: every GPU decision, made here."""
    b = _Builder(plan)
    gpu = b.plan
    kernels = b.kernels()
    return CudaLayout(
        plan=gpu, block=(BLOCK_UNITS, BLOCK_ROWS), tile_k=TILE_K, stages=b.stages,
        double_buffered=b.double_buffered, kernels=kernels, all_rows=b.all_rows(kernels), all_rows_max=ALL_ROWS,
        persistent=b.persistent(kernels), scan=gpu.scan_only,
        hoisted=plan.hoisted is not None, delayed=bool(plan.hoisted is not None and plan.hoisted.delayed),
        buffers=b.buffers(), recurrent_states=gpu.recurrent_states,
        delay_state=plan.delay_states[0] if plan.delay_states else None,
        unit_params=(*gpu.unit_params, *gpu.epilogue_biases),
    )
