"""backend="cuda" in numba's CUDA simulator == the CPU backend == the independent NumPy references.

numba picks the simulator when ``numba.cuda`` is first imported, so these cases run in a
process of their own: ``test_cuda_backend.py`` starts ``python -m pytest tests/cuda_sim_cases.py``
with ``NUMBA_ENABLE_CUDASIM=1`` (pytest does not collect this file by itself). On a machine with
a GPU, run the same file without the variable to check the real device. Shapes are small (the
simulator runs a Python thread per CUDA thread) but cross every boundary: B and H not
multiples of the 32x4 block, several blocks and K tiles, ragged lengths with zeros, random
initial states, float32 and float64.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from references import STEPS, bidirectional_dynamic_rnn, dynamic_rnn, multi_rnn, random_params, state_sizes

from cellgen.backends.cuda import graph, steps
from cellgen.build import build
from cellgen.runtime.stack import multi_rnn as cellgen_multi_rnn

SPECS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.py"))
TOL = {np.float32: 1e-5, np.float64: 1e-10}
LSTM_HYPER = {"forget_bias": 0.7, "cell_clip": 0.6, "proj_clip": 0.4}


def _module(name: str):
    return importlib.import_module(f"generated.{name}")


def _case(name: str, dtype, batch: int, steps: int, isize: int, units: int, proj: int, seed: int = 0):
    """Parameters, batch-major inputs, a random initial state and ragged lengths (some zero)."""
    rng = np.random.default_rng(seed)
    num_proj = proj if name == "lstm" else None
    params = random_params(name, isize, units, rng, dtype, num_proj=num_proj)
    inputs = rng.standard_normal((batch, steps, isize)).astype(dtype)
    state = tuple(rng.standard_normal((batch, n)).astype(dtype) for n in state_sizes(name, units, isize, num_proj))
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0], lengths[-1] = steps, 0
    return params, inputs, state, lengths


def _close(got, want, dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def _check(name, dtype, batch, steps, isize, units, proj) -> None:
    params, inputs, state, lengths = _case(name, dtype, batch, steps, isize, units, proj)
    hyper = LSTM_HYPER if name == "lstm" else {}
    mod = _module(name)
    out_gpu, st_gpu = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state,
                                      backend="cuda", **hyper)
    out_cpu, st_cpu = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, **hyper)
    out_ref, st_ref = dynamic_rnn(name, params, inputs, lengths, state, **hyper)
    _close(out_gpu, out_cpu, dtype)
    _close(out_gpu, out_ref, dtype)
    for got, cpu, ref in zip(st_gpu, st_cpu, st_ref, strict=True):
        _close(got, cpu, dtype)
        _close(got, ref, dtype)


STEPPED = [name for name in SPECS if not name.startswith("qrnn")]  # qrnn*: one scan kernel, no step loop


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", SPECS)
def test_every_spec_matches_cpu_and_reference(name: str, dtype) -> None:
    assert name in STEPS
    steps.forget()
    _check(name, dtype, batch=5, steps=4, isize=3, units=7, proj=6)
    # auto: the simulator runs the persistent kernel (one block) for every cell with a recurrent GEMM
    expected = "persistent" if name in STEPPED else None
    assert steps.last_path() == expected


@pytest.mark.parametrize("name", STEPPED)
def test_persistent_kernel_over_several_chunks_and_row_groups(name: str) -> None:
    # one simulated block keeps both 32-unit chunks of every stage (37 units, 33 projected) and loops over
    # 3 row groups of 8 (B = 18); 5 steps: odd T leaves a double-buffered state in the second buffer
    steps.forget()
    with steps.forced("persistent"):
        _check(name, np.float64, batch=18, steps=5, isize=20, units=37, proj=33)
    assert steps.last_path() == "persistent"


@pytest.mark.parametrize(("name", "units", "capacity", "grid"), [
    (n, u, c, g) for n in ("basic_rnn", "basic_lstm", "gru_cudnn") for u, c, g in ((37, 4, 4), (37, 7, 6), (70, 2, 2))
] + [("basic_lstm", 37, 10, 10), ("basic_lstm", 37, 3, 2)])
def test_persistent_grid_splits_chunks_and_rows(name: str, units: int, capacity: int, grid: int) -> None:
    # One step of a one-stage cell: no block reads what another writes in the launch, so the simulator's
    # blocks (run one after another, its grid barrier a block barrier) are exact, and what is checked is the
    # kernel's split of (chunk, row group) over the grid: 37 units = 2 chunks, 18 rows = 5 groups of 4;
    # capacity 4 -> 2 x 2 blocks, 7 -> 2 x 3 (row groups r, r + 3), 10 -> 2 x 5, 3 -> 2 x 1; 70 units = 3
    # chunks on 2 blocks: block 0 keeps chunks 0 and 2, block 1 chunk 1, all rows.
    steps.forget()
    with steps.forced("persistent", simulated_blocks=capacity):
        _check(name, np.float32, batch=18, steps=1, isize=5, units=units, proj=units)
    assert steps.last_path() == "persistent" and steps.last_grid() == grid


@pytest.mark.parametrize(("name", "batch"), [(n, b) for n in STEPPED for b in (5, 18)])
def test_per_step_launches(name: str, batch: int) -> None:
    # B = 5: the <name>_all kernels (one 32x16 block over all rows); B = 18: 32x4 blocks, 5 row blocks
    with steps.forced("launches"):
        _check(name, np.float32, batch=batch, steps=2, isize=20, units=37, proj=33)
    assert steps.last_path() == "launches"


def test_graph_mode_falls_back_to_the_launches_in_the_simulator() -> None:
    # the simulator cannot capture a graph: the same per-step launches run one by one, same numbers
    graph.clear()
    with steps.forced("graph"):
        _check("lstm", np.float32, batch=5, steps=3, isize=4, units=7, proj=6)
    assert steps.last_path() == "launches" and not graph.CACHE


@pytest.mark.parametrize(("name", "batch", "steps"), [("lstm", 5, 3), ("gru", 5, 3), ("qrnn", 9, 8)])
def test_several_blocks_and_tiles(name: str, batch: int, steps: int) -> None:
    # input 20 > a 16-wide K tile, 37 units > one 32-unit block and one 32-row K tile, 5 and 9 rows >
    # one 4-row block; qrnn's 8 * 9 = 72 rows > one 64-row tile of the hoisted GEMM.
    _check(name, np.float32, batch=batch, steps=steps, isize=20, units=37, proj=33)


@pytest.mark.parametrize(("name", "time_major"), [("gru", False), ("qrnn", True), ("basic_lstm", False)])
def test_bidirectional(name: str, time_major: bool) -> None:
    dtype = np.float64
    params_fw, inputs, state, lengths = _case(name, dtype, 4, 5, 3, 6, 5, seed=1)
    params_bw = random_params(name, 3, 6, np.random.default_rng(2), dtype)
    if time_major:
        inputs = np.ascontiguousarray(inputs.transpose(1, 0, 2))
    mod = _module(name)
    (fw, bw), (sfw, sbw) = mod.bidirectional_dynamic_rnn(params_fw, params_bw, inputs, sequence_length=lengths,
                                                         initial_state_fw=state, time_major=time_major,
                                                         backend="cuda")
    (rfw, rbw), (rsfw, rsbw) = bidirectional_dynamic_rnn(name, params_fw, params_bw, inputs, lengths, state,
                                                         time_major=time_major)
    _close(fw, rfw, dtype)
    _close(bw, rbw, dtype)
    for got, want in zip((*sfw, *sbw), (*rsfw, *rsbw), strict=True):
        _close(got, want, dtype)


def test_multi_rnn() -> None:
    dtype = np.float32
    rng = np.random.default_rng(3)
    lstm = random_params("lstm", 3, 7, rng, dtype, num_proj=5)
    gru = random_params("gru", 5, 6, rng, dtype)
    qrnn = random_params("qrnn_f", 6, 4, rng, dtype)
    inputs = rng.standard_normal((3, 5, 3)).astype(dtype)
    lengths = np.array([5, 2, 0])
    layers = [(_module("lstm"), lstm, LSTM_HYPER), (_module("gru"), gru), (_module("qrnn_f"), qrnn)]
    out, states = cellgen_multi_rnn(layers, inputs, sequence_length=lengths, backend="cuda")
    ref_out, ref_states = multi_rnn([("lstm", lstm, LSTM_HYPER), ("gru", gru, {}), ("qrnn_f", qrnn, {})], inputs,
                                    lengths)
    _close(out, ref_out, dtype)
    for got, want in zip(states, ref_states, strict=True):
        for a, b in zip(got, want, strict=True):
            _close(a, b, dtype)


@pytest.mark.parametrize("time_major", [False, True])
def test_device_arrays_in_and_out(time_major: bool) -> None:
    from numba import cuda

    dtype = np.float32
    params, inputs, state, lengths = _case("qrnn", dtype, 5, 4, 3, 7, 6)
    if time_major:
        inputs = np.ascontiguousarray(inputs.transpose(1, 0, 2))
    mod = _module("qrnn")
    host_out, host_state = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state,
                                           time_major=time_major, backend="cuda")
    dev_state = tuple(cuda.to_device(s) for s in state)
    out, final = mod.dynamic_rnn({k: cuda.to_device(v) for k, v in params.items()}, cuda.to_device(inputs),
                                 sequence_length=cuda.to_device(lengths), initial_state=dev_state,
                                 time_major=time_major, backend="cuda")
    assert cuda.devicearray.is_cuda_ndarray(out)
    assert all(cuda.devicearray.is_cuda_ndarray(s) for s in final)
    _close(out.copy_to_host(), host_out, dtype)
    for got, want in zip(final, host_state, strict=True):
        _close(got.copy_to_host(), want, dtype)
    for dev, initial in zip(dev_state, state, strict=True):  # the caller's state is not overwritten
        np.testing.assert_array_equal(dev.copy_to_host(), initial)


def test_host_parameters_cached_until_changed_in_place() -> None:
    """Issue 13, item 4: a second call reuses the uploaded weights and the device buffers and gives the
    same numbers; a parameter changed in place between calls (a kernel, a peephole vector) is packed
    and uploaded again: never a stale weight."""
    from cellgen.backends.cuda import reuse
    from cellgen.backends.cuda.runtime import POOL

    dtype = np.float32
    params, inputs, state, lengths = _case("lstm", dtype, 3, 4, 3, 5, 4)
    mod = _module("lstm")

    def both():
        args = {"sequence_length": lengths, "initial_state": state, **LSTM_HYPER}
        return mod.dynamic_rnn(params, inputs, backend="cuda", **args), mod.dynamic_rnn(params, inputs, **args)

    (out1, st1), (cpu1, _) = both()
    packs, allocations = reuse.WEIGHTS.packs, POOL.allocations
    (out2, st2), _ = both()
    assert (reuse.WEIGHTS.packs, POOL.allocations) == (packs, allocations)  # nothing packed, nothing allocated
    np.testing.assert_array_equal(out2, out1)
    for a, b in zip(st2, st1, strict=True):
        np.testing.assert_array_equal(a, b)
    _close(out1, cpu1, dtype)
    for name in ("kernel", "w_f_diag"):
        params[name] *= 1.5  # in place: same array, same address
        (out3, st3), (cpu3, cst3) = both()
        _close(out3, cpu3, dtype)
        for a, b in zip(st3, cst3, strict=True):
            _close(a, b, dtype)
        assert np.abs(out3 - out1).max() > 1e-3
        assert reuse.WEIGHTS.packs == packs + 1
        packs += 1


class _TransferSpy:
    """Counts device-to-host copies and host reads of simulated device arrays, and host-to-device uploads."""

    def __init__(self, monkeypatch) -> None:
        from numba import cuda
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        self.to_host, self.to_device, self.host_reads = [], [], []
        copy, forward, upload = FakeCUDAArray.copy_to_host, FakeCUDAArray.__getattr__, cuda.to_device

        def copy_to_host(arr, *args, **kwargs):
            self.to_host.append((arr.shape, np.dtype(arr.dtype)))
            return copy(arr, *args, **kwargs)

        def getattr_(arr, name):
            if name.startswith("__array"):  # np.asarray(device array): a silent host read in the simulator
                self.host_reads.append(name)
            return forward(arr, name)

        def to_device(obj, *args, **kwargs):
            self.to_device.append(np.shape(obj))
            return upload(obj, *args, **kwargs)

        monkeypatch.setattr(FakeCUDAArray, "copy_to_host", copy_to_host)
        monkeypatch.setattr(FakeCUDAArray, "__getattr__", getattr_)
        monkeypatch.setattr(cuda, "to_device", to_device)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_device_arrays_never_go_through_the_host(name: str, monkeypatch) -> None:
    """Issue 13, item 4: device parameters, inputs and states are packed and copied on the device only
    (the device lengths' B values are read for their range check, nothing else comes back), the
    results equal the CPU backend's, and a device parameter changed in place is picked up (gru: fused
    blocks packed on the device; lstm: per-unit parameter vectors, 4 interleaved gates)."""
    from numba import cuda

    dtype = np.float32
    params, inputs, state, lengths = _case(name, dtype, 3, 4, 3, 5, 4)
    hyper = LSTM_HYPER if name == "lstm" else {}
    mod = _module(name)
    dev = {k: cuda.to_device(v) for k, v in params.items()}
    args = {"sequence_length": cuda.to_device(lengths.astype(np.int64)), **hyper}
    dev_x, dev_state = cuda.to_device(inputs), tuple(cuda.to_device(s) for s in state)
    cpu_before = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, **hyper)
    spy = _TransferSpy(monkeypatch)
    runs = [mod.dynamic_rnn(dev, dev_x, initial_state=dev_state, backend="cuda", **args)]
    first = params[next(iter(params))]
    first *= 1.5
    dev[next(iter(params))].copy_to_device(first)  # changed in place on the device
    runs.append(mod.dynamic_rnn(dev, dev_x, initial_state=dev_state, backend="cuda", **args))
    assert spy.to_host == [((3,), np.dtype(np.int64))] * 2 and spy.host_reads == [] and spy.to_device == []
    monkeypatch.undo()
    cpu_after = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, **hyper)
    for (out, final), cpu in zip(runs, (cpu_before, cpu_after), strict=True):
        _close(out.copy_to_host(), cpu[0], dtype)
        for got, want in zip(final, cpu[1], strict=True):
            _close(got.copy_to_host(), want, dtype)
    for d, s in zip(dev_state, state, strict=True):  # the caller's initial state is not overwritten
        np.testing.assert_array_equal(d.copy_to_host(), s)


def test_gpu_check_quick_in_the_simulator(tmp_path: Path) -> None:
    """``cellgen gpu-check --quick`` runs as written (a scan spec, float64 and bfloat16: the cheapest in the
    simulator): every case of the report, the bfloat16 rows against float64 within their tolerance, cuDNN
    skipped, exit 0, the JSON."""
    import json

    from cellgen.cli import main

    report = tmp_path / "report.json"
    assert main(["gpu-check", "--quick", "--specs", "qrnn_f", "--dtypes", "float64,bfloat16", "--repeat", "1",
                 "--warmup", "0", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["ok"] and data["environment"]["simulator"] is True
    cases = {(c["section"], c["shape"], c["case"]): c["status"] for c in data["checks"]}
    for case in ("ragged lengths, random state", "second call (bit for bit)", "device arrays",
                 "device arrays, second call (bit for bit)", "bidirectional"):
        assert cases[("forward", "B3 T3 H5", case)] == "ok"
    assert cases[("training", "B3 T3 H5", "outputs and every gradient (relative)")] == "ok"
    half = {c["case"]: c["status"] for c in data["checks"] if c["dtype"] == "bfloat16"}
    assert half == {f"{case} (vs float64; error / tolerance)": "ok" for case in (
        "ragged lengths, random state", "step loop persistent", "step loop graph", "step loop launches",
        "device arrays", "bidirectional")}
    assert all(0 < c["diff"] <= 1 for c in data["checks"] if c["dtype"] == "bfloat16")
    assert [c["section"] for c in data["checks"] if c["status"] == "skipped"] == ["cuDNN"]  # no torch GPU here
    (row,) = data["timings"]
    assert row["spec"] == "qrnn_f" and row["forward_ms"] is None and row["host_launch_ms"] > 0
    assert row["path"] is None and {m: p["ran"] for m, p in row["paths"].items()} == dict.fromkeys(
        ("persistent", "graph", "launches"))  # a scan: no step loop


def test_gpu_check_runs_every_step_loop(tmp_path: Path) -> None:
    """On a stepped cell the check runs each forced step loop against the cpu backend and times it; in the
    simulator the graph falls back to the launches, and says so."""
    from cellgen.tools import gpu_check_cases, gpu_check_time

    checks = gpu_check_cases.forward_checks(_module("basic_rnn"), "float64", "tiny", (3, 3, 2, 5))
    loops = {c.case: (c.status, c.note) for c in checks if c.case.startswith("step loop")}
    assert loops == {"step loop persistent": ("ok", ""), "step loop graph": ("ok", "ran launches"),
                     "step loop launches": ("ok", "")}
    row = gpu_check_time.time_one(_module("basic_rnn"), "tiny", (2, 3, 4, 4), repeat=1, warmup=0, torch=False)
    assert row["path"] == "persistent"
    assert {m: p["ran"] for m, p in row["paths"].items()} == {"persistent": "persistent", "graph": "launches",
                                                              "launches": "launches"}
    assert all(p["max_diff"] <= 1e-6 for p in row["paths"].values())  # float32, 3 steps, the same sums


def test_gpu_check_targets_with_torch_on_the_cpu(monkeypatch) -> None:
    """The targets section runs as written with torch on the CPU standing in for cuDNN (wall time): a row per
    (cell, dtype, phase) with both times, their ratio beside the issue's target; the bfloat16 forward and
    inputs gradient within their tolerance of float64, cuDNN's error in the note; a tolerance of 0 fails them."""
    import torch

    from cellgen.tools import gpu_check_cases, gpu_check_targets

    stand_in = gpu_check_targets.Torch(torch, "cpu")
    checks, rows = gpu_check_targets.targets(_module, ["basic_lstm", "gru_cudnn", "qrnn"], ["float32", "bfloat16"],
                                             quick=True, repeat=1, warmup=0, torch=stand_in, progress=lambda s: None)
    assert [(r["spec"], r["dtype"], r["phase"]) for r in rows] == [
        (spec, dtype, phase) for spec in ("basic_lstm", "gru_cudnn") for dtype in ("float32", "bfloat16")
        for phase in ("forward", "training step")]
    for r in rows:
        assert r["cellgen_ms"] > 0 and r["cudnn_ms"] > 0
        assert r["ratio"] == pytest.approx(r["cellgen_ms"] / r["cudnn_ms"]) and r["met"] == (r["ratio"] <= r["target"])
        assert r["target"] == gpu_check_targets.TARGETS[r["phase"], r["dtype"]]
    assert "| basic_lstm | B2 T3 H4 | bfloat16 | forward |" in gpu_check_targets.table(rows)
    assert [(c.spec, c.status) for c in checks] == [(s, "ok") for s in ("basic_lstm",) * 2 + ("gru_cudnn",) * 2]
    assert all(0 < c.diff <= 1 and c.note.startswith("cuDNN bfloat16: ") for c in checks)
    monkeypatch.setattr(gpu_check_cases, "HALF_RTOL", {"bfloat16": 0.0})
    monkeypatch.setattr(gpu_check_cases, "HALF_ATOL", 0.0)
    p = gpu_check_targets.Problem.make(_module("gru_cudnn"), (2, 3, 4, 4))
    assert [c.status for c in gpu_check_targets.bfloat16_checks(p, "tiny", None)] == ["MISMATCH"] * 2
    none_rows = gpu_check_targets.targets(_module, ["basic_lstm"], ["float32"], quick=True, repeat=1, warmup=0,
                                          progress=lambda s: None)[1]
    assert {(r["cudnn_ms"], r["met"]) for r in none_rows} == {(None, None)}  # no torch GPU here: not timed


def test_gpu_check_reports_a_mismatch(monkeypatch, tmp_path: Path) -> None:
    """A difference above the tolerance is a MISMATCH (bit-for-bit repeats stay ok), and any mismatch
    makes the command exit 1 with ``ok: false`` in its JSON."""
    import json

    from cellgen.cli import main
    from cellgen.tools import gpu_check, gpu_check_cases, gpu_check_time, gpu_check_torch

    monkeypatch.setitem(gpu_check_cases.TOL, "float64", -1.0)
    checks = gpu_check_cases.forward_checks(_module("qrnn_f"), "float64", "tiny", (2, 2, 3, 4))
    assert {c.case: c.status for c in checks} == {
        "ragged lengths, random state": "MISMATCH", "second call (bit for bit)": "ok", "device arrays": "MISMATCH",
        "device arrays, second call (bit for bit)": "ok", "bidirectional": "MISMATCH",
        "step loop persistent": "MISMATCH", "step loop graph": "MISMATCH", "step loop launches": "MISMATCH"}
    monkeypatch.setattr(gpu_check, "run_checks", lambda *args, **kwargs: checks)
    monkeypatch.setattr(gpu_check_time, "timings", lambda *args: [])
    monkeypatch.setattr(gpu_check_torch, "torch_checks", lambda *args: [])
    report = tmp_path / "report.json"
    assert main(["gpu-check", "--quick", "--specs", "qrnn_f", "--json", str(report)]) == 1
    assert json.loads(report.read_text())["ok"] is False


MIXED_SPEC = '''"""A cell no shipped spec resembles: a stage-0 operand buffer (c * c), two gate sizes in one GEMM."""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("mixed", doc=__doc__)
num_proj = cell.size("num_proj")
x = cell.input()
c = cell.state("c")
h = cell.state("h", size=num_proj)
a = cell.linear([x, c * c], gates=("a",), kernel="a/kernel", bias="a/bias")
p = cell.linear([h], gates=("p",), kernel="p/kernel", bias=None, size=num_proj)
cell.update(c, tanh(a) + 0.5 * c)
cell.update(h, sigmoid(p) * h + 0.1 * tanh(p))
cell.output(tanh(p))
'''


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unfused_fallback_kernels(tmp_path: Path, dtype) -> None:
    """Epilogue 0 and an unfusable stage run as elementwise kernels and agree with the module's unfused
    NumPy backend (the CPU backend is left out: compiling it here would double the test's time)."""
    spec = tmp_path / "mixed.py"
    spec.write_text(MIXED_SPEC)
    (result,) = build([spec], tmp_path / "out")
    loader = importlib.util.spec_from_file_location("mixed_generated", result.target)
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    forward = {k for k in mod._CUDA_SOURCES[np.dtype(dtype).name] if not k.startswith(("train_", "backward"))}
    # no persistent kernel (elementwise kernels have no GEMM to keep on chip): the per-step kernels, and for
    # B <= 16 their all-rows variants
    assert forward == {"epilogue0", "stage0", "epilogue1", "epilogue0_all", "stage0_all", "epilogue1_all"}
    assert mod._CUDA_RUNTIME[:2] == ("hoisted", "hoisted_tn")  # + their tensor-core kernels
    rng = np.random.default_rng(4)
    params = mod.init_params(3, 7, num_proj=5, dtype=dtype, seed=0)
    inputs = rng.standard_normal((5, 4, 3)).astype(dtype)
    state = mod.State(rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal((5, 5)).astype(dtype))
    lengths = [4, 0, 2, 3, 1]
    steps.forget()
    got = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend="cuda")
    assert steps.last_path() == "launches"  # auto: the graph, which the simulator cannot capture
    want = mod.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend="reference")
    _close(got[0], want[0], dtype)
    for a, b in zip(got[1], want[1], strict=True):
        _close(a, b, dtype)


def test_bench_cuda_runs_as_written() -> None:
    """The GPU benchmark's code path (the simulator records no time: only the rows are checked)."""
    from cellgen.tools.bench_cuda import bench_cuda

    rows = bench_cuda([_module("lstm"), _module("qrnn")], [("tiny", (2, 2, 3, 4))], repeat=1, warmup=0)
    assert [(r["cell"], r["impl"]) for r in rows] == [("lstm", "cellgen cuda"), ("qrnn", "cellgen cuda")]
    assert [r["step_loop"] for r in rows] == ["persistent", "scan"]  # the simulator's automatic choice
    assert all(r["device"] == "simulator" and {"best_ms", "median_ms"} <= set(r) for r in rows)


@pytest.mark.parametrize("name", ["lstm", "basic_lstm", "qrnn"])
def test_bench_cuda_forward_repeats_one_call(name: str) -> None:
    """Issue 13: the kernels update the states in place, so the benchmark's forward starts each run
    from its own copy of the initial states: a second run equals the first, and both equal the CPU
    backend (before the fix the second lstm run was 0.18 off)."""
    from cellgen.tools.bench_cuda import _cellgen_case

    mod = _module(name)
    params, call, forward = _cellgen_case(mod, 3, 4, 5, 6, seed=0)
    initial = [s.copy_to_host() for s in call.states]
    runs = [forward() for _ in range(2)]
    out_cpu, st_cpu = mod.dynamic_rnn(params, call.xs.copy_to_host(), time_major=True)
    for out, states in runs:
        _close(out.copy_to_host(), out_cpu, np.float32)
        recurrent = [s for s, rec in zip(st_cpu, mod.RECURRENT, strict=True) if rec]
        for got, want in zip(states, recurrent, strict=True):
            _close(got.copy_to_host(), want, np.float32)
    np.testing.assert_array_equal(runs[1][0].copy_to_host(), runs[0][0].copy_to_host())
    for state, before in zip(call.states, initial, strict=True):  # the call's initial states are never written
        np.testing.assert_array_equal(state.copy_to_host(), before)


def test_bench_cuda_compares_a_fresh_call(monkeypatch) -> None:
    """Issue 13: the output bench_cuda compares with torch's is a call on the fresh inputs and states,
    the CPU backend's numbers, not one made from states the timed runs have advanced (0.18 off)."""
    from cellgen.tools import bench_cuda

    compared = []
    monkeypatch.setattr(bench_cuda, "_torch_row", lambda module, params, call, out, *_: compared.append(
        (params, call.xs.copy_to_host(), out)))
    bench_cuda.bench_cuda([_module("lstm")], [("tiny", (3, 4, 5, 6))], repeat=2, warmup=1, torch=True)
    ((params, xs, out),) = compared
    want, _ = _module("lstm").dynamic_rnn(params, xs, time_major=True)
    _close(out, want, np.float32)


@pytest.mark.parametrize(("name", "batch", "steps"), [("lstm", 0, 3), ("lstm", 2, 0), ("qrnn", 0, 3), ("qrnn", 2, 0)])
def test_empty_batch_or_time(name: str, batch: int, steps: int) -> None:
    params, inputs, state, _ = _case(name, np.float64, max(batch, 1), max(steps, 1), 3, 4, 3)
    inputs = inputs[:batch, :steps]
    state = tuple(s[:batch] for s in state)
    hyper = LSTM_HYPER if name == "lstm" else {}
    out, final = _module(name).dynamic_rnn(params, inputs, initial_state=state, backend="cuda", **hyper)
    ref_out, ref_final = dynamic_rnn(name, params, inputs, None, state, **hyper)
    _close(out, ref_out, np.float64)
    for got, want in zip(final, ref_final, strict=True):
        _close(got, want, np.float64)


def _on_random_specs(seed_offset: int, folder_name: str, check, tmp_path_factory) -> None:
    """``check(fz, folder)`` on CELLGEN_FUZZ_CUDA_EXAMPLES (default 4) of the fuzzer's random specs, not
    degenerate, drawn with seed CELLGEN_FUZZ_SEED + ``seed_offset``, each written to a folder of its own."""
    import os

    from fuzz_specs import degenerate, specs
    from hypothesis import HealthCheck, Phase, assume, given, seed, settings

    @seed(int(os.environ.get("CELLGEN_FUZZ_SEED", "0")) + seed_offset)
    @settings(max_examples=int(os.environ.get("CELLGEN_FUZZ_CUDA_EXAMPLES", "4")), deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(fz=specs())
    def run(fz) -> None:
        folder = tmp_path_factory.mktemp(folder_name)
        (folder / "probe.py").write_text(fz.text)
        assume(not degenerate(folder / "probe.py"))
        check(fz, folder)

    run()


def test_random_specs_on_the_simulator(tmp_path_factory) -> None:
    """A sample of the differential fuzzer's random specs (test_fuzz.py) on backend="cuda":
    against the evaluator of their equations, float64 (CELLGEN_FUZZ_CUDA_EXAMPLES, default 4)."""
    from fuzz_specs import check_spec

    _on_random_specs(1, "fuzz_cuda", lambda fz, folder: check_spec(fz, folder, dtypes=(np.float64,),
                                                                  backends=("cuda",)), tmp_path_factory)


# -- training: the backward on the device ---------------------------------------------------------
#: Specs whose cuda gradients are also checked against finite differences of the cuda forward here (one
#: of each kind: a delay state and no recurrent GEMM, two stages, peepholes/clips/projection).
FD_SPECS = ("qrnn", "gru", "lstm")
def _all_grads(mod, g) -> dict[str, np.ndarray]:
    return {"inputs": np.asarray(g.inputs), **{f"params[{k}]": v for k, v in g.params.items()},
            **{f"initial_state.{n}": np.asarray(s) for n, s in zip(mod.STATE, g.initial_state, strict=True)}}


@pytest.mark.parametrize("name", SPECS)
def test_backward_equals_reference_and_finite_differences(name: str) -> None:
    """cuda's gradients == the reference backend's (float64, 1e-12), and a directional central
    difference along a random direction for every array (1e-6) of the forward, evaluated by the
    reference backend: the cuda forward equals it to 1e-12 (test_every_spec_matches_cpu_and_reference),
    and each simulated forward costs seconds."""
    from gradcheck import directional_error, linear_loss, make_case, relative_error, run, vjp, weights

    case = make_case(name, seed=21)
    grads = {}
    for backend in ("cuda", "reference"):
        (out, state), backward = vjp(case, backend)
        r_out, r_states = weights(out, state)
        grads[backend] = _all_grads(case.mod, backward(r_out, case.mod.State(*r_states)))
    for key, want in grads["reference"].items():
        assert relative_error(grads["cuda"][key], want) <= 1e-12, key
    if name not in FD_SPECS:  # the reference's gradients are finite-difference checked entry by entry
        return

    def loss() -> float:
        return linear_loss(*run(case, "reference"), r_out, r_states)

    values = {"inputs": case.inputs, **{f"params[{k}]": v for k, v in case.params.items()},
              **{f"initial_state.{n}": s for n, s in zip(case.mod.STATE, case.initial, strict=True)}}
    rng = np.random.default_rng(3)
    errors = {k: directional_error(loss, v, grads["cuda"][k], rng) for k, v in values.items()}
    assert all(e <= 1e-6 for e in errors.values()), errors


@pytest.mark.parametrize("name", ["gru", "qrnn"])
def test_bidirectional_backward_and_device_arrays(name: str) -> None:
    """bidirectional_dynamic_rnn_vjp on cuda == the cpu backend's; device inputs give device gradients."""
    from numba import cuda

    from gradcheck import make_case, relative_error, weights

    from cellgen.backends.cuda.runtime import is_device_array

    case, other = make_case(name, seed=23), make_case(name, seed=24)
    mod = case.mod
    results = {}
    for backend in ("cuda", "cpu"):
        ((o_fw, o_bw), (s_fw, s_bw)), backward = mod.bidirectional_dynamic_rnn_vjp(
            case.params, other.params, case.inputs, sequence_length=case.lengths, initial_state_fw=case.initial,
            initial_state_bw=other.initial, backend=backend)
        r_fw, rs_fw = weights(o_fw, s_fw, 1)
        r_bw, rs_bw = weights(o_bw, s_bw, 2)
        g = backward((r_fw, r_bw), (mod.State(*rs_fw), mod.State(*rs_bw)))
        results[backend] = [g.inputs, *g.params_fw.values(), *g.params_bw.values(), *g.initial_state_fw,
                            *g.initial_state_bw]
    for got, want in zip(results["cuda"], results["cpu"], strict=True):
        assert relative_error(got, want) <= 1e-12
    (out, state), backward = mod.dynamic_rnn_vjp(case.params, cuda.to_device(case.inputs),
                                                 sequence_length=case.lengths, backend="cuda")
    g = backward(cuda.to_device(np.ones(out.shape)))
    assert is_device_array(g.inputs) and g.inputs.shape == case.inputs.shape
    assert all(is_device_array(s) for s in g.initial_state)


#: The shipped specs with a recurrent GEMM: their backward runs one fused kernel per transposed GEMM a step.
GEMM_SPECS = ("basic_lstm", "basic_rnn", "gru", "gru_cudnn", "lstm")


def _cuda_vs_reference(case) -> None:
    from gradcheck import relative_error, vjp, weights

    grads = {}
    for backend in ("cuda", "reference"):
        (out, state), backward = vjp(case, backend)
        r_out, r_states = weights(out, state)
        grads[backend] = _all_grads(case.mod, backward(r_out, case.mod.State(*r_states)))
    for key, want in grads["reference"].items():
        assert relative_error(grads["cuda"][key], want) <= 1e-12, key


@pytest.mark.parametrize("name", GEMM_SPECS)
def test_fused_backward_several_blocks_and_tiles(name: str) -> None:
    """The fused backward kernels at sizes that are multiples of nothing: B = 5 (lengths 0 and T
    among them: 2 row blocks), H = 37 (2 unit blocks; the reduction over G*37 gate columns spans
    several K tiles), random initial states; float64 gradients == the reference backend's (1e-12)."""
    from gradcheck import make_case

    mod = _module(name)
    assert {f"backward_stage{s}" for s in range(len(mod._CUDA_GATES))} <= set(mod._CUDA_SOURCES["float64"])
    case = make_case(name, seed=31, lengths=(4, 0, 2, 4, 1), units=37, input_size=5,
                     sizes={"num_proj": 33} if name == "lstm" else None)
    _cuda_vs_reference(case)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_unfused_backward_fallback(name: str, tmp_path: Path, monkeypatch) -> None:
    """The backward's fallback (each epilogue its own kernel, each transposed GEMM the runtime's GEMM),
    forced for a shipped two-stage spec, equals the reference backend's gradients."""
    from gradcheck import make_case

    from cellgen.backends.cuda import backward as cuda_backward

    layout_of = cuda_backward.layout_of
    monkeypatch.setattr(cuda_backward, "layout_of", lambda tp, fuse=True: layout_of(tp, fuse=False))
    (result,) = build([Path(__file__).resolve().parent.parent / "specs" / f"{name}.py"], tmp_path / "out")
    loader = importlib.util.spec_from_file_location(f"unfused_{name}", result.target)
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    kernels = {k for k in mod._CUDA_SOURCES["float64"] if k.startswith("backward")}
    assert kernels == {"backward0", "backward1", "backward2"}
    _cuda_vs_reference(make_case(name, seed=32, lengths=(3, 0, 2), units=6, mod=mod,
                                 sizes={"num_proj": 4} if name == "lstm" else None))


def _random_backward_equals_reference(fz, folder: Path, tol: float = 1e-10) -> set[str]:
    """One drawn spec: the cuda backward's float64 gradients == the reference backend's (``tol``);
    returns the module's backward kernels (fused or not)."""
    from fuzz_specs import Evaluator, build_spec, load_cell, random_inputs
    from gradcheck import relative_error

    path, module = build_spec(fz.text, folder)
    ev = Evaluator(load_cell(path), fz.input_size, fz.num_units, fz.sizes)
    params, inputs, lengths, initial = random_inputs(ev, fz, np.dtype(np.float64))
    grads = {}
    for backend in ("cuda", "reference"):
        (out, states), backward = module.dynamic_rnn_vjp(params, inputs, sequence_length=lengths,
                                                         initial_state=module.State(*initial), backend=backend,
                                                         **fz.hyper)
        r_rng = np.random.default_rng(fz.seed + 1)
        r_out = r_rng.standard_normal(np.shape(out))
        g = backward(r_out, module.State(*(r_rng.standard_normal(np.shape(s)) for s in states)))
        grads[backend] = {**{f"params[{k}]": v for k, v in g.params.items()}, "inputs": g.inputs,
                          **{f"initial_state.{n}": s for n, s in zip(module.STATE, g.initial_state, strict=True)}}
    for name, want in grads["reference"].items():
        assert relative_error(grads["cuda"][name], want) <= tol, f"cuda and reference differ in {name}"
    return {k for k in module._CUDA_SOURCES["float64"] if k.startswith("backward")}


def test_random_specs_backward_on_the_simulator(tmp_path_factory) -> None:
    """The training fuzzer's random specs (fused where backward_layout allows, the fallback elsewhere) on
    backend="cuda": gradients == the reference backend's, float64 (CELLGEN_FUZZ_CUDA_EXAMPLES, default 4)."""
    _on_random_specs(2, "fuzz_cuda_backward", _random_backward_equals_reference, tmp_path_factory)


#: Two stages; stage 0's operand is [h, c] (two parts of num_units: a thread of its transposed GEMM keeps
#: two accumulators, drec0[b, j] and drec0[b, num_units + j]), stage 1's is one.
TWO_PART_SPEC = '''"""Two stages: stage 0's operand is two states of one size, stage 1's one."""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("two_part", doc=__doc__)
x = cell.input()
c = cell.state("c")
h = cell.state("h")
i, f = cell.linear([x, h, c], gates=("i", "f"), kernel="k", bias="b")
new_c = sigmoid(f) * c + tanh(i) * sigmoid(i)
p = cell.linear([tanh(new_c)], gates=("p",), kernel="p/kernel", bias=None)
cell.update(c, new_c)
cell.update(h, tanh(p) + 0.5 * h)
cell.output(h)
'''
#: The same with q of another size: stage 0's operand parts differ (num_units, k), so its transposed
#: GEMM is the runtime's and its epilogue a kernel of its own, beside a fused stage 1.
HALF_FUSED_SPEC = '''"""Two stages: stage 0's operand is two states of two sizes, stage 1's one."""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("half_fused", doc=__doc__)
k = cell.size("k")
x = cell.input()
h = cell.state("h")
q = cell.state("q", size=k)
i, f = cell.linear([x, h, q], gates=("i", "f"), kernel="a", bias="b")
new_h = sigmoid(f) * h + tanh(i) * sigmoid(i)
p = cell.linear([tanh(new_h)], gates=("p",), kernel="p/kernel", bias=None, size=k)
cell.update(h, new_h)
cell.update(q, tanh(p) + 0.5 * q)
cell.output(new_h)
'''


@pytest.mark.parametrize(("text", "sizes", "expected"), [
    (TWO_PART_SPEC, {}, {"backward0", "backward_stage1", "backward_stage0"}),
    (HALF_FUSED_SPEC, {"k": 33}, {"backward0", "backward_stage1", "backward2"}),
], ids=["two_part_operand", "fused_and_fallback"])
def test_backward_operand_parts_and_fallback(text: str, sizes, expected, tmp_path: Path) -> None:
    """A transposed GEMM whose result is two operand parts (two accumulators a thread), and a step with
    both a fused stage and the fallback (the runtime's GEMM, then epilogue 2 as its own kernel);
    H = 37, float64 gradients == the reference backend's (1e-12)."""
    from fuzz_specs import from_text

    spec = from_text(text, num_units=37, input_size=3, sizes=sizes, seed=5)
    assert _random_backward_equals_reference(spec, tmp_path, tol=1e-12) == expected
