"""Every CPU schedule mode, forced, against the independent references (tests/references.py).

The CPU backend picks a mode per plan (cellgen.backends.cpu.schedule: steps, scan, fused_scan)
and, per call, how the threads split the work (cellgen.backends.cpu.gemm: panels or batch rows,
the hoisted GEMM up front or by blocks of steps, a one-row scan by units). Each of those paths is
forced here by replacing the per-call decision with a fixed answer, the decision is checked to
have been asked (the path really ran), and every path's numbers must equal the reference
(1e-10 in float64) and, bit for bit, the one-thread path's.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import references

from cellgen.backends.cpu import gemm, sync
from cellgen.backends.cpu.schedule import Mode, cpu_schedule
from cellgen.build import build, compile_spec

REPO = Path(__file__).resolve().parent.parent

#: A scan with no hoisted GEMM (mode "scan"): the input is read elementwise.
ELEMENTWISE = """
from cellgen.dsl import NUM_UNITS, Cell, tanh

cell = Cell("ew_scan", doc="h' = tanh(x + u * h): an IndRNN without input projection.")
x = cell.input(size=NUM_UNITS)
h = cell.state("h")
u = cell.param("u")
new_h = tanh(x + u * h)
cell.update(h, new_h)
cell.output(new_h)
"""

#: name -> the per-call decisions a case forces (gemm function -> its answer).
STEP_CASES = {
    "one_thread": {"threads_for_steps": 1, "hoist_block": 0},
    "one_thread_blocked": {"threads_for_steps": 1, "hoist_block": 3},
    "panels": {"threads_for_steps": 2, "split_rows": False, "hoist_block": 0},
    "panels_blocked": {"threads_for_steps": 2, "split_rows": False, "hoist_block": 3},
    "by_rows": {"threads_for_steps": 2, "split_rows": True, "hoist_block": 0},
    "by_rows_blocked": {"threads_for_steps": 2, "split_rows": True, "hoist_block": 3},
}
SCAN_CASES = {
    "one_thread": {"threads_for": 1},
    "rows": {"threads_for": 2, "scan_blocks": (2, 3)},
    "units": {"threads_for": 2, "scan_blocks": (2, 3), "scan_unit_split": (2, gemm.ROWS)},
}


@pytest.fixture(scope="module")
def elementwise(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    spec = root / "ew_scan.py"
    spec.write_text(ELEMENTWISE)
    build([spec], root / "gen_modes")
    sys.path.insert(0, str(root))
    try:
        yield spec, importlib.import_module("gen_modes.ew_scan")
    finally:
        sys.path.remove(str(root))


def _force(monkeypatch, answers: dict[str, object]) -> dict[str, int]:
    """Make each named gemm decision return its answer; count how often each was asked."""
    asked = dict.fromkeys(answers, 0)
    for name, answer in answers.items():
        def decide(*_args, _name=name, _answer=answer):
            asked[_name] += 1
            return _answer
        monkeypatch.setattr(gemm, name, decide)
    return asked


def _record_called_off(monkeypatch) -> list[bool]:
    """Record every answer of sync.called_off (True: the threads did not all run at once)."""
    answers: list[bool] = []
    real = sync.called_off

    def called_off(words):
        answers.append(bool(real(words)))
        return answers[-1]

    monkeypatch.setattr(sync, "called_off", called_off)
    return answers


def _inputs(batch: int, steps: int, isize: int, units: int, sizes: tuple[int, ...], seed: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, steps, isize))
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0] = steps
    if batch > 2:
        lengths[1] = 0
    state = tuple(rng.standard_normal((batch, n)) for n in sizes)
    return x, lengths, state


def test_each_plan_gets_its_mode(elementwise) -> None:
    modes = {name: cpu_schedule(compile_spec(REPO / "specs" / f"{name}.py")[1]).mode
             for name in ("basic_lstm", "lstm", "gru", "qrnn", "qrnn_ifo")}
    assert modes == {"basic_lstm": Mode.STEPS, "lstm": Mode.STEPS, "gru": Mode.STEPS,
                     "qrnn": Mode.FUSED_SCAN, "qrnn_ifo": Mode.FUSED_SCAN}
    spec_path, _ = elementwise
    schedule = cpu_schedule(compile_spec(spec_path)[1])
    assert schedule.mode is Mode.SCAN and schedule.pre is None and schedule.unit_split is None
    qrnn = cpu_schedule(compile_spec(REPO / "specs" / "qrnn.py")[1])
    assert qrnn.pre == "ring" and qrnn.pre_first and qrnn.unit_split is not None


def _threads_available() -> None:
    assert numba.get_num_threads() >= 2, "the forced two-thread paths need NUMBA_NUM_THREADS >= 2"


@pytest.mark.parametrize("name", ["basic_lstm", "lstm", "gru"])
def test_step_loop_modes(name: str, monkeypatch) -> None:
    _threads_available()
    mod = importlib.import_module(f"generated.{name}")
    isize, units, proj = 5, 7, 4
    sizes = {"num_proj": proj} if name == "lstm" else {}
    params = mod.init_params(isize, units, dtype=np.float64, seed=2, **sizes)
    x, lengths, state = _inputs(7, 8, isize, units, mod.state_size(units, **sizes))
    want, want_state = references.dynamic_rnn(name, params, x, lengths, state)
    results = {}
    for case, answers in STEP_CASES.items():
        with monkeypatch.context() as m:
            asked = _force(m, answers)
            called_off = _record_called_off(m)
            out, final = mod.dynamic_rnn(params, x, sequence_length=lengths, initial_state=state)
        assert all(asked.values()), (case, asked)  # every forced decision was taken
        assert not any(called_off), case  # the threads ran together: the parallel path itself
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10, err_msg=case)
        for got, ref in zip(final, want_state, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=case)
        results[case] = (out, *final)
    for case, arrays in results.items():
        for a, b in zip(arrays, results["one_thread"], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: {case} vs one thread")


@pytest.mark.parametrize("name", ["qrnn", "qrnn_ifo"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_scan_modes(name: str, dtype, monkeypatch) -> None:
    _threads_available()
    mod = importlib.import_module(f"generated.{name}")
    isize, units = 6, 4 * gemm.panel_width(dtype)  # whole panels: the one-row unit split applies
    params = mod.init_params(isize, units, dtype=dtype, seed=3)
    for batch in (5, 1):
        x, lengths, state = _inputs(batch, 9, isize, units, mod.state_size(units, input_size=isize))
        x, state = x.astype(dtype), tuple(s.astype(dtype) for s in state)
        want, _ = references.dynamic_rnn(name, {k: v.astype(np.float64) for k, v in params.items()},
                                         x.astype(np.float64), lengths, [s.astype(np.float64) for s in state])
        tol = 1e-10 if dtype == np.float64 else 2e-5
        results = {}
        for case, answers in SCAN_CASES.items():
            if case == "units" and batch != 1:
                continue
            with monkeypatch.context() as m:
                asked = _force(m, answers)
                out, final = mod.dynamic_rnn(params, x, sequence_length=lengths, initial_state=state)
            assert all(asked.values()), (case, asked)
            np.testing.assert_allclose(out, want, rtol=tol, atol=tol, err_msg=f"{case} B={batch}")
            results[case] = (out, *final)
        for case, arrays in results.items():
            for a, b in zip(arrays, results["one_thread"], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} B={batch}: {case} vs one thread")


def test_elementwise_scan_modes(elementwise, monkeypatch) -> None:
    _threads_available()
    _, mod = elementwise
    units = 6
    params = mod.init_params(units, units, dtype=np.float64, seed=4)
    x, lengths, (h0,) = _inputs(5, 8, units, units, (units,))
    want = np.zeros((5, 8, units))
    h = h0.copy()
    for t in range(8):  # the spec's published equation, h' = tanh(x + u * h), masked per length
        new = np.tanh(x[:, t] + params["u"] * h)
        active = (t < lengths)[:, None]
        want[:, t] = np.where(active, new, 0.0)
        h = np.where(active, new, h)
    results = {}
    for case, answers in {"one_thread": {"threads_for": 1}, "rows": {"threads_for": 2}}.items():
        with monkeypatch.context() as m:
            asked = _force(m, answers)
            out, (final,) = mod.dynamic_rnn(params, x, sequence_length=lengths, initial_state=(h0,))
        assert all(asked.values()), case
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(final, h, rtol=1e-12, atol=1e-12, err_msg=case)
        results[case] = (out, final)
    for a, b in zip(results["rows"], results["one_thread"], strict=True):
        np.testing.assert_array_equal(a, b)
