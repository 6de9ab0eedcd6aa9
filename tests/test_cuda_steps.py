"""The CUDA step loop's choices (cellgen.backends.cuda.steps) and the CUDA-graph capture (graph.py), no GPU.

The persistent kernel's numbers are checked in the simulator (cuda_sim_cases.py); here: the rule
that says whether its weight slices fit, the forced and automatic choice, and the capture wrapper
run against a fake driver (the simulator cannot capture graphs), which records what a real one
would be asked to do.
"""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from cellgen.backends.cuda import graph, steps
from cellgen.backends.cuda.layout import cuda_layout
from cellgen.backends.cuda.steps import StageShape, persistent_grid, shared_bytes
from cellgen.build import compile_spec

H100_OPTIN, A100_OPTIN = 232448, 166912  # MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 227 KiB, 163 KiB


def test_doctests() -> None:
    for module in (steps, graph):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(("shapes", "itemsize", "optin", "expected"), [
    # basic_lstm / gru_cudnn H = 256 float32: 8 blocks, one 256 x 128 (96) slice each
    ([StageShape(256, 256, 128)], 4, H100_OPTIN, (8, 131072)),
    ([StageShape(256, 256, 96)], 4, A100_OPTIN, (8, 98304)),
    # lstm H = 256 with a 256 projection: a stage-0 and a stage-1 slice per block
    ([StageShape(256, 256, 128), StageShape(256, 256, 32)], 4, H100_OPTIN, (8, 163840)),
    ([StageShape(256, 256, 128), StageShape(256, 256, 32)], 4, A100_OPTIN, None),  # 160 KiB > 0.9 * 163 KiB
    ([StageShape(256, 256, 128)], 8, H100_OPTIN, None),  # float64: 256 KiB
    ([StageShape(768, 768, 128)], 4, H100_OPTIN, None),  # H = 768: 384 KiB a slice, the graph then
    ([StageShape(128, 128, 32)], 4, H100_OPTIN, (4, 16384)),  # basic_rnn H = 128
])
def test_persistent_rule(shapes, itemsize: int, optin: int, expected) -> None:
    assert persistent_grid(shapes, itemsize, 132, optin) == expected


def test_fewer_blocks_keep_several_slices() -> None:
    # a device that holds 3 co-resident blocks: each keeps ceil(8 / 3) = 3 slices of basic_rnn H = 256
    assert shared_bytes([StageShape(256, 256, 32)], 3, 4) == 3 * 256 * 32 * 4
    assert persistent_grid([StageShape(256, 256, 32)], 4, 3, H100_OPTIN) == (3, 98304)
    assert persistent_grid([StageShape(256, 256, 32)], 4, 0, H100_OPTIN) is None  # no cooperative launch


def test_show_says_which_step_loop_runs() -> None:
    plan = compile_spec(Path(__file__).resolve().parent.parent / "specs" / "lstm.py")[1]
    layout = cuda_layout(plan)
    sizes = {sym: 256 for sym in plan.spec.all_sizes}
    lines = steps.describe(layout, 64, sizes)
    assert lines[0] == "GPU per-step kernels at B=64: stage0 32x4, stage1 32x4"
    assert lines[1] == ("GPU step loop (float32, H100/H200): persistent, 128 blocks of 32x4, 160 KiB of weight a "
                        "block, 2 grid barrier(s) a step")
    assert lines[2].startswith("GPU step loop (float32, A100): CUDA graph (the weight slices need 160 KiB")
    small = steps.describe(layout, 16, {sym: 768 for sym in plan.spec.all_sizes})
    assert small[0] == "GPU per-step kernels at B=16: stage0_all 32x16, stage1_all 32x16  (B <= 16: one block " \
        "over all rows)" and all("CUDA graph" in line for line in small[1:])


def test_the_choice_and_forcing_it(monkeypatch) -> None:
    monkeypatch.delenv(steps.ENV, raising=False)
    assert steps.mode(persistent=True) == "persistent" and steps.mode(persistent=False) == "graph"
    for forced in ("graph", "launches"):
        monkeypatch.setenv(steps.ENV, forced)
        assert steps.mode(persistent=True) == forced
    monkeypatch.setenv(steps.ENV, "persistent")
    assert steps.mode(persistent=False) == "graph"  # no persistent kernel (a fallback epilogue kernel)
    with steps.forced("launches"):
        assert steps.mode(persistent=True) == "launches"  # forced() over the environment
    monkeypatch.setenv(steps.ENV, "fast")
    with pytest.raises(ValueError, match="CELLGEN_CUDA_STEPS='fast'"):
        steps.mode(persistent=True)


# -- the graph capture, against a fake driver ---------------------------------------------------
class Array:
    """A device array as a launch sees it: its __cuda_array_interface__."""

    def __init__(self, ptr: int, shape=(2, 3)) -> None:
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "strides": None,
                                         "typestr": "<f4", "version": 3}


class Kernel:
    """Records its launches: (name, grid, block, stream, args)."""

    def __init__(self, name: str, log: list, fail_at: int | None = None) -> None:
        self.name, self.log, self.fail_at = name, log, fail_at

    def __getitem__(self, config):
        grid, block, *stream = config

        def launch(*args):
            if self.fail_at is not None and args and args[0] == self.fail_at:
                raise RuntimeError("launch failed")
            self.log.append((self.name, grid, block, stream[0] if stream else None, args))

        return launch


class Driver:
    """A GraphDriver that records its calls; a graph is the list of launches captured while capturing."""

    def __init__(self, log: list) -> None:
        self.log, self.calls, self.live = log, [], set()

    def begin(self, stream) -> None:
        self.calls.append(("begin", stream))
        self.mark = len(self.log)

    def end(self, stream):
        self.calls.append(("end", stream))
        return ("graph", tuple(self.log[self.mark:]))

    def instantiate(self, g):
        self.calls.append(("instantiate",))
        exe = ("exec", g[1])
        self.live.add(exe)
        return exe

    def launch(self, exe, stream) -> None:
        assert exe in self.live
        self.calls.append(("launch", stream, len(exe[1])))

    def destroy_graph(self, g) -> None:
        self.calls.append(("destroy_graph",))

    def destroy_exec(self, exe) -> None:
        self.live.discard(exe)
        self.calls.append(("destroy_exec",))


def _step_launches(stage0: Kernel, stage1: Kernel, h: Array, hn: Array, steps_: int) -> list:
    """What a forward's step loop records: two stages a step, a double-buffered state swapped after each."""
    launches = []
    for t in range(steps_):
        launches.append((stage0, (2, 1), (32, 16), (t, h, hn)))
        launches.append((stage1, (1, 1), (32, 16), (t, hn)))
        h, hn = hn, h
    return launches


@pytest.fixture
def fake():
    graph.clear()
    log: list = []
    yield log, Driver(log), Kernel("stage0", log), Kernel("stage1", log)
    graph.CACHE.clear()


def test_a_graph_captures_the_launches_once_and_replays_them(fake) -> None:
    log, driver, stage0, stage1 = fake
    launches = _step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 3)
    assert graph.run(launches, driver=driver, stream="s")
    # captured: the very launches, in order, on the capture stream
    assert [(n, a[0]) for n, _, _, _, a in log] == [("stage0", 0), ("stage1", 0), ("stage0", 1), ("stage1", 1),
                                                    ("stage0", 2), ("stage1", 2)]
    assert all(s == "s" for _, _, _, s, _ in log) and log[2][4][1:] == (launches[2][3][1], launches[2][3][2])
    assert [c[0] for c in driver.calls] == ["begin", "end", "instantiate", "destroy_graph", "launch"]
    assert driver.calls[-1] == ("launch", "s", 6)

    # the same launches again (new argument objects, same pointers and shapes): replayed, nothing captured
    driver.calls.clear()
    again = _step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 3)
    assert graph.run(again, driver=driver, stream="s") and len(log) == 6
    assert driver.calls == [("launch", "s", 6)]


@pytest.mark.parametrize("change", ["pointer", "shape", "steps", "scalar", "grid"])
def test_a_graph_is_captured_again_when_anything_it_captured_differs(fake, change: str) -> None:
    log, driver, stage0, stage1 = fake
    assert graph.run(_step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 3), driver=driver, stream="s")
    other = _step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 3)
    if change == "pointer":
        other = _step_launches(stage0, stage1, Array(0x1000), Array(0x3000), 3)
    elif change == "shape":
        other = _step_launches(stage0, stage1, Array(0x1000, (4, 3)), Array(0x2000), 3)
    elif change == "steps":
        other = _step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 4)
    elif change == "scalar":
        other[1] = (stage1, (1, 1), (32, 16), (7, other[1][3][1]))
    else:
        other[0] = (stage0, (3, 1), (32, 16), other[0][3])
    driver.calls.clear()
    assert graph.run(other, driver=driver, stream="s")
    assert [c[0] for c in driver.calls] == ["begin", "end", "instantiate", "destroy_graph", "launch"]
    assert len(graph.CACHE) == 2


def test_a_failed_capture_runs_nothing_and_is_not_cached(fake) -> None:
    log, driver, stage0, _ = fake
    bad = Kernel("stage1", log, fail_at=1)
    assert not graph.run(_step_launches(stage0, bad, Array(0x1000), Array(0x2000), 3), driver=driver, stream="s")
    assert [c[0] for c in driver.calls] == ["begin", "end", "destroy_graph"]  # the capture ended, nothing launched
    assert not graph.CACHE and not driver.live


def test_the_cache_keeps_the_most_recent_graphs(fake) -> None:
    log, driver, stage0, stage1 = fake
    for i in range(graph.MAX_GRAPHS + 2):
        assert graph.run(_step_launches(stage0, stage1, Array(0x1000 * (i + 1)), Array(0x99000), 2), driver=driver,
                         stream="s")
    assert len(graph.CACHE) == graph.MAX_GRAPHS == len(driver.live)
    assert sum(c[0] == "destroy_exec" for c in driver.calls) == 2
    graph.clear()
    assert not driver.live


def test_steps_run_launches_in_order_where_no_graph_can_be_made(fake, monkeypatch) -> None:
    log, _, stage0, stage1 = fake
    monkeypatch.setattr(graph, "run", lambda launches: False)
    launches = _step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 2)
    steps.run(launches, graph=True)
    assert steps.last_path() == "launches"
    assert [(n, g, b, s, a) for n, g, b, s, a in log] == [(k.name, g, b, None, a) for k, g, b, a in launches]
    monkeypatch.setattr(graph, "run", lambda launches: True)
    steps.run(launches, graph=True)
    assert steps.last_path() == "graph" and len(log) == 4  # replayed by the graph, not launched again


def test_a_driver_that_cannot_capture_runs_nothing(fake) -> None:
    log, driver, stage0, stage1 = fake

    def refuse(stream) -> None:
        raise RuntimeError("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")

    driver.begin = refuse
    assert not graph.run(_step_launches(stage0, stage1, Array(0x1000), Array(0x2000), 2), driver=driver, stream="s")
    assert not log and not driver.calls and not graph.CACHE
