"""``cellgen gpu-check``'s correctness cases: ``backend="cuda"`` against the cpu backend.

Per shipped spec, dtype and shape: ragged lengths (T and 0 among them) with a random initial
state, the same call again (equal bit for bit), device-array parameters, inputs, lengths and
states (twice), bidirectional, and one training step (``dynamic_rnn_vjp`` + backward of a random
linear loss: outputs and every gradient). float16 / bfloat16 (storage only, float32 arithmetic; no
training): the same forward cases on the inputs, weights and states rounded to the storage dtype, against
the cpu backend in float64 on those rounded values (:func:`half_checks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from cellgen.backends.cuda import precision, steps
from cellgen.backends.cuda import runtime as rtc

#: Correctness shapes (B, T, I, H): the issue's, sizes that are multiples of nothing, and B > 16 (4-row blocks
#: per step; the persistent kernel on 8 blocks with 3 row groups, an odd T).
SHAPES = {"B16 T64 H768": (16, 64, 768, 768), "B5 H37": (5, 9, 37, 37), "B20 T17 H256": (20, 17, 256, 256)}
#: ``--quick``: one tiny shape of odd sizes (the simulator runs a Python thread per CUDA thread).
QUICK_SHAPES = {"B3 T3 H5": (3, 3, 5, 5)}
#: The storage dtypes checked (float16 / bfloat16: forward only, against float64).
DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF_DTYPES = precision.HALF
#: A half result against float64: within half an ulp of the storage dtype (relative, its one rounding) plus
#: what float32 arithmetic adds (the float32 rows' tolerance); reported as error / that bound (ok <= 1).
HALF_RTOL = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
HALF_ATOL = 2e-4
#: Largest |cuda - cpu| allowed (outputs are tanh/sigmoid-bounded; H=768 sums, T=64 steps).
TOL = {"float32": 2e-4, "float64": 1e-9}
#: Largest relative error of a gradient (norm of the difference / norm of the cpu gradient).
GRAD_TOL = {"float32": 1e-3, "float64": 1e-9}
#: Hyperparameters that switch a spec's optional paths on (lstm's clips).
HYPER = {"lstm": {"cell_clip": 3.0, "proj_clip": 2.0}}


@dataclass
class Check:
    """One comparison: ``ok`` unless ``diff`` > ``tol``; ``status`` "ok", "MISMATCH", "skipped" or "not built"."""

    section: str
    spec: str
    dtype: str
    shape: str
    case: str
    diff: float | None
    tol: float | None
    status: str
    note: str = ""


def status(diff: float, tol: float) -> str:
    return "ok" if diff <= tol else "MISMATCH"  # a NaN diff is a mismatch too


def max_diff(got, want) -> float:
    got, want = rtc.to_host(got), np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - want).max(initial=0.0))


def rel_error(got, want) -> float:
    got, want = rtc.to_host(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


@dataclass
class Case:
    """One spec's random call: parameters, batch-major inputs, ragged lengths and a random initial state."""

    module: ModuleType
    params: dict[str, np.ndarray]
    inputs: np.ndarray
    lengths: np.ndarray
    state: tuple[np.ndarray, ...]
    hyper: dict[str, float]


def make_case(module: ModuleType, shape: tuple[int, int, int, int], dtype: str, seed: int) -> Case:
    """Lengths hold T (row 0) and 0 (the last row) and random ones between; the state is random."""
    batch, steps, isize, units = shape
    rng = np.random.default_rng(seed)
    sizes = {name: units for name in module.SIZES}
    params = module.init_params(isize, units, dtype=np.dtype(dtype), seed=seed, **sizes)
    width = module._CELL.input_width({"input_size": isize, "num_units": units, **sizes})
    inputs = rng.standard_normal((batch, steps, width)).astype(dtype)
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0], lengths[-1] = steps, 0
    state = tuple(rng.standard_normal((batch, n)).astype(dtype) for n in module.state_size(units, **sizes))
    return Case(module, params, inputs, lengths, state, HYPER.get(module.NAME, {}))


def _compare(section: str, case: Case, dtype: str, shape: str, name: str, got, want, tol: float) -> list[Check]:
    (out, states), (ref_out, ref_states) = got, want
    diff = max([max_diff(out, ref_out)] + [max_diff(a, b) for a, b in zip(states, ref_states, strict=True)])
    return [Check(section, case.module.NAME, dtype, shape, name, diff, tol, status(diff, tol))]


def _same(first, second) -> float:
    """0 when two results are equal bit for bit (NaNs included), else the largest difference."""
    (o1, s1), (o2, s2) = first, second
    pairs = [(o1, o2), *zip(s1, s2, strict=True)]
    if all(np.array_equal(rtc.to_host(a), rtc.to_host(b), equal_nan=True) for a, b in pairs):
        return 0.0
    return max(max_diff(a, b) for a, b in pairs) or float("inf")


def forward_checks(module: ModuleType, dtype: str, label: str, shape: tuple[int, int, int, int]) -> list[Check]:
    """cuda == cpu on host arrays; a second call equal bit for bit; device arrays; bidirectional."""
    cuda = rtc.numba_cuda()
    case = make_case(module, shape, dtype, seed=1)
    args = {"sequence_length": case.lengths, **case.hyper}
    tol = TOL[dtype]
    cpu = module.dynamic_rnn(case.params, case.inputs, initial_state=case.state, **args)
    first = module.dynamic_rnn(case.params, case.inputs, initial_state=case.state, backend="cuda", **args)
    second = module.dynamic_rnn(case.params, case.inputs, initial_state=case.state, backend="cuda", **args)
    checks = _compare("forward", case, dtype, label, "ragged lengths, random state", first, cpu, tol)
    diff = _same(first, second)
    checks.append(Check("forward", module.NAME, dtype, label, "second call (bit for bit)", diff, 0.0,
                        status(diff, 0.0)))
    for mode in ("persistent", "graph", "launches"):  # each step loop forced (a path that cannot run falls back)
        with steps.forced(mode):
            steps.forget()
            got = module.dynamic_rnn(case.params, case.inputs, initial_state=case.state, backend="cuda", **args)
            ran = steps.last_path()
        for c in _compare("forward", case, dtype, label, f"step loop {mode}", got, cpu, tol):
            checks.append(dataclasses.replace(c, note="" if ran in (mode, None) else f"ran {ran}"))
    dev_params = {k: cuda.to_device(v) for k, v in case.params.items()}
    dev_args = {"sequence_length": cuda.to_device(case.lengths.astype(np.int64)), **case.hyper}
    dev_state = tuple(cuda.to_device(s) for s in case.state)
    dev_x = cuda.to_device(case.inputs)
    dev = [module.dynamic_rnn(dev_params, dev_x, initial_state=dev_state, backend="cuda", **dev_args)
           for _ in range(2)]
    checks += _compare("forward", case, dtype, label, "device arrays", dev[0], cpu, tol)
    diff = _same(dev[0], dev[1])
    checks.append(Check("forward", module.NAME, dtype, label, "device arrays, second call (bit for bit)", diff,
                        0.0, status(diff, 0.0)))
    other = make_case(module, shape, dtype, seed=2)
    bi = {"sequence_length": case.lengths, "initial_state_fw": case.state, "initial_state_bw": other.state,
          **case.hyper}
    (gf, gb), (sf, sb) = module.bidirectional_dynamic_rnn(case.params, other.params, case.inputs, backend="cuda",
                                                          **bi)
    (cf, cb), (tf, tb) = module.bidirectional_dynamic_rnn(case.params, other.params, case.inputs, **bi)
    diff = max(max_diff(gf, cf), max_diff(gb, cb),
               *(max_diff(a, b) for a, b in zip((*sf, *sb), (*tf, *tb), strict=True)))
    checks.append(Check("forward", module.NAME, dtype, label, "bidirectional", diff, tol, status(diff, tol)))
    return checks


def training_check(module: ModuleType, dtype: str, label: str, shape: tuple[int, int, int, int]) -> Check:
    """One training step (``dynamic_rnn_vjp`` + backward of a random linear loss) on cuda vs cpu."""
    case = make_case(module, shape, dtype, seed=3)
    args = {"sequence_length": case.lengths, "initial_state": case.state, **case.hyper}
    grads = {}
    for backend in ("cuda", "cpu"):
        (out, state), backward = module.dynamic_rnn_vjp(case.params, case.inputs, backend=backend, **args)
        weights = np.random.default_rng(4).standard_normal(np.shape(out)).astype(dtype)
        g = backward(weights)
        grads[backend] = [rtc.to_host(out), rtc.to_host(g.inputs), *map(rtc.to_host, g.params.values()),
                          *map(rtc.to_host, g.initial_state)]
    diff = max(rel_error(a, b) for a, b in zip(grads["cuda"], grads["cpu"], strict=True))
    tol = GRAD_TOL[dtype]
    return Check("training", module.NAME, dtype, label, "outputs and every gradient (relative)", diff, tol,
                 status(diff, tol))


def half_fraction(got, want, storage: str) -> float:
    """``max |got - want| / (HALF_RTOL |want| + HALF_ATOL)`` (inf for a shape or dtype mismatch)."""
    got = rtc.to_host(got)
    if got.shape != np.shape(want) or precision.storage_name(got.dtype) != storage:
        return float("inf")
    bound = HALF_RTOL[storage] * np.abs(want) + HALF_ATOL
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero bound: inf (or NaN), a mismatch either way
        return float((np.abs(got.astype(np.float64) - want) / bound).max(initial=0.0))


def _rounded(case: Case, storage: str) -> Case:
    """A case's arrays rounded to ``storage`` (host float16 / ml_dtypes.bfloat16 arrays)."""
    def held(a: np.ndarray) -> np.ndarray:
        bits = precision.to_storage(a, storage)
        return precision.host_bfloat16(bits) if storage == "bfloat16" else bits

    return dataclasses.replace(case, params={k: held(v) for k, v in case.params.items()}, inputs=held(case.inputs),
                               state=tuple(held(s) for s in case.state))


def _wide(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _device(a: np.ndarray, storage: str):
    cuda = rtc.numba_cuda()
    bits = cuda.to_device(np.ascontiguousarray(a).view(np.uint16) if storage == "bfloat16" else a)
    return precision.bfloat16_device(bits) if storage == "bfloat16" else bits


def _results(result) -> list:
    """A dynamic_rnn result (outputs, states) as a flat list of arrays."""
    out, states = result
    return [out, *states]


def _half_row(module: ModuleType, storage: str, label: str, name: str, got: list, want: list) -> Check:
    diff = max(half_fraction(a, b, storage) for a, b in zip(got, want, strict=True))
    return Check("forward", module.NAME, storage, label, f"{name} (vs float64; error / tolerance)", diff, 1.0,
                 status(diff, 1.0))


def half_checks(module: ModuleType, storage: str, label: str, shape: tuple[int, int, int, int]) -> list[Check]:
    """float16 / bfloat16 storage against the cpu backend in float64 on the rounded values: ragged lengths with
    a random state, each step loop forced, device arrays (bfloat16 ones marked), bidirectional."""
    case = _rounded(make_case(module, shape, "float32", seed=1), storage)
    args = {"sequence_length": case.lengths, **case.hyper}
    wide = {k: _wide(v) for k, v in case.params.items()}
    want = module.dynamic_rnn(wide, _wide(case.inputs), initial_state=tuple(map(_wide, case.state)), **args)
    got = module.dynamic_rnn(case.params, case.inputs, initial_state=case.state, backend="cuda", **args)
    want = _results(want)
    checks = [_half_row(module, storage, label, "ragged lengths, random state", _results(got), want)]
    for mode in ("persistent", "graph", "launches"):
        with steps.forced(mode):
            steps.forget()
            got = module.dynamic_rnn(case.params, case.inputs, initial_state=case.state, backend="cuda", **args)
            ran = steps.last_path()
        row = _half_row(module, storage, label, f"step loop {mode}", _results(got), want)
        checks.append(dataclasses.replace(row, note="" if ran in (mode, None) else f"ran {ran}"))
    cuda = rtc.numba_cuda()
    out, states = module.dynamic_rnn({k: _device(v, storage) for k, v in case.params.items()},
                                     _device(case.inputs, storage),
                                     initial_state=tuple(_device(s, storage) for s in case.state), backend="cuda",
                                     **{**args, "sequence_length": cuda.to_device(case.lengths.astype(np.int64))})
    checks.append(_half_row(module, storage, label, "device arrays",
                            [out.copy_to_host(), *(s.copy_to_host() for s in states)], want))
    other = _rounded(make_case(module, shape, "float32", seed=2), storage)
    bi = {"sequence_length": case.lengths, **case.hyper}
    (gf, gb), (sf, sb) = module.bidirectional_dynamic_rnn(case.params, other.params, case.inputs, backend="cuda",
                                                          initial_state_fw=case.state, initial_state_bw=other.state,
                                                          **bi)
    (cf, cb), (tf, tb) = module.bidirectional_dynamic_rnn(
        wide, {k: _wide(v) for k, v in other.params.items()}, _wide(case.inputs),
        initial_state_fw=tuple(map(_wide, case.state)), initial_state_bw=tuple(map(_wide, other.state)), **bi)
    checks.append(_half_row(module, storage, label, "bidirectional", [gf, gb, *sf, *sb], [cf, cb, *tf, *tb]))
    return checks


def run_checks(modules: Sequence[ModuleType], dtypes: Sequence[str], shapes: dict[str, tuple[int, int, int, int]],
               progress: Callable[[str], None] = print) -> list[Check]:
    """Every forward and training check of every module, dtype and shape."""
    checks: list[Check] = []
    for module in modules:
        for dtype in dtypes:
            for label, shape in shapes.items():
                progress(f"  {module.NAME} {dtype} {label}")
                if dtype in HALF_DTYPES:
                    checks += half_checks(module, dtype, label, shape)
                    continue
                checks += forward_checks(module, dtype, label, shape)
                checks.append(training_check(module, dtype, label, shape))
    return checks


def table(checks: Sequence[Check]) -> str:
    lines = ["| section | spec | dtype | shape | case | max diff | tol | status |",
             "|---|---|---|---|---|---:|---:|---|"]
    for c in checks:
        diff = "" if c.diff is None else f"{c.diff:.2e}"
        tol = "" if c.tol is None else f"{c.tol:.0e}"
        shown = c.status + (f" ({c.note})" if c.note else "")
        lines.append(f"| {c.section} | {c.spec} | {c.dtype} | {c.shape} | {c.case} | {diff} | {tol} | {shown} |")
    return "\n".join(lines)
