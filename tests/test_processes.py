"""Processes and threads: after a call on the parallel path, a forked child (``os.fork``, a
fork ``multiprocessing.Pool``) computes what its parent computes with every generated module
and nothing hangs; Python threads calling at once get what the same calls in a row get.

Every wait has a deadline, so a hang fails the test instead of stopping the suite. No speed
is asserted here (docs/performance.md has the measurements).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cellgen.backends.cpu import gemm
from cellgen.runtime import pool

REPO = Path(__file__).resolve().parent.parent
#: every module in generated/
MODULES = tuple(sorted(p.stem for p in (REPO / "generated").glob("*.py") if not p.stem.startswith("_")))
INPUT, UNITS, EXTRA_SIZE = 64, 128, 64
#: (batch, steps): both take a parallel path in every shipped module on 2+ threads (checked
#: below): the step loop split by panels (and the hoisted GEMM up front), or a scan split by
#: rows; one row: the panels of every step, or a scan split by units.
SHAPES = ((8, 512), (1, 64))
TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(pool.max_threads() < 2, reason="needs 2+ Numba threads for the parallel path")

Case = tuple[str, int, int]
Result = list[np.ndarray]


def _inputs(name: str, batch: int, steps: int) -> tuple[object, dict, np.ndarray]:
    module = importlib.import_module(f"generated.{name}")
    sizes = {size: EXTRA_SIZE for size in module.SIZES}
    params = module.init_params(INPUT, UNITS, seed=1, **sizes)
    x = np.random.default_rng(batch * 1000 + steps).standard_normal((batch, steps, INPUT)).astype(np.float32)
    return module, params, x


def _call(case: Case) -> Result:
    module, params, x = _inputs(*case)
    lengths = np.arange(x.shape[0]) % 3 + x.shape[1] - 2  # ragged
    out, state = module.dynamic_rnn(params, x, sequence_length=lengths)
    return [out, *state]


CASES: tuple[Case, ...] = tuple((name, b, t) for name in MODULES for b, t in SHAPES)


@contextmanager
def _counting_regions() -> Iterator[list[int]]:
    """Counts the parallel regions started (pool.parallel called) while inside."""
    count = [0]
    real = pool.parallel

    def spy(fn, *args):
        count[0] += 1
        return real(fn, *args)

    pool.parallel = spy
    try:
        yield count
    finally:
        pool.parallel = real


@pytest.fixture(scope="module")
def expected() -> dict[Case, Result]:
    """Every case run once here, each checked to start at least one parallel region."""
    results = {}
    for case in CASES:
        with _counting_regions() as regions:
            results[case] = _call(case)
        assert regions[0] >= 1, f"{case} did not take a parallel path"
    return results


def _same(got: Result, want: Result) -> bool:
    return len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def _fork(child: Callable[[], object]) -> object:
    """Run ``child()`` in a process made by ``os.fork`` and return what it returned (pickled
    through a pipe). The child is killed, and the test fails, if it takes over TIMEOUT."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            signal.alarm(int(TIMEOUT) + 5)
            with os.fdopen(write, "wb") as pipe:
                pickle.dump(child(), pipe)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    with os.fdopen(read, "rb") as pipe:
        os.set_blocking(pipe.fileno(), False)
        status = None
        while status is None:
            data = pipe.read()
            if data:
                chunks.append(data)
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"forked child still running after {TIMEOUT} s")
            else:
                time.sleep(0.02)
        rest = pipe.read()
        if rest:
            chunks.append(rest)
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, f"forked child ended with {code} (negative: killed by that signal)"
    return pickle.loads(b"".join(chunks))


def _child_runs_every_case(expected: dict[Case, Result]) -> Callable[[], dict]:
    def child() -> dict:
        with _counting_regions() as regions:
            mismatched = [case for case in CASES if not _same(_call(case), expected[case])]
        return {"mismatched": mismatched, "regions": regions[0], "layer": pool.layer()}

    return child


def test_forked_child_computes_the_same_outputs_with_every_module(expected) -> None:
    report = _fork(_child_runs_every_case(expected))
    assert report["mismatched"] == []
    if report["layer"] != "omp":  # a GNU OpenMP parent's child runs serially (cellgen.runtime.pool)
        assert report["regions"] >= len(CASES)  # the child ran the parallel paths too


def test_fork_while_another_thread_runs_a_parallel_region(expected) -> None:
    """The region lock is held across fork and made anew in the child: a child forked while
    another thread is inside a parallel region neither inherits a held lock nor a busy pool."""
    case = ("basic_lstm", 8, 512)
    stop = threading.Event()
    errors: list[str] = []

    def busy() -> None:
        while not stop.is_set():
            if not _same(_call(case), expected[case]):
                errors.append("busy thread got different outputs")

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    try:
        for _ in range(3):
            time.sleep(0.01)
            assert _fork(lambda: _same(_call(case), expected[case])) is True
    finally:
        stop.set()
        worker.join(TIMEOUT)
    assert not worker.is_alive() and errors == []


def _pool_call(case: Case) -> Result:
    return _call(case)


def test_fork_pool_map_does_not_hang(expected) -> None:
    cases = [case for case in CASES if case[0] in ("basic_lstm", "qrnn", "gru_cudnn")]
    workers = multiprocessing.get_context("fork").Pool(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            results = workers.map_async(_pool_call, cases).get(timeout=TIMEOUT)
    finally:
        workers.terminate()
        workers.join()
    assert [case for case, got in zip(cases, results, strict=True) if not _same(got, expected[case])] == []


def test_threads_calling_at_once_get_the_serial_results(expected) -> None:
    """Four Python threads at once, each through several modules and shapes (parallel paths
    and a small serial one): bit-identical to the calls in a row."""
    small = ("basic_lstm", 2, 3)  # small work: the serial kernel, without the lock
    want_small = _call(small)
    plans = [[CASES[(k + 3 * i) % len(CASES)] for i in range(4)] + [small] for k in range(4)]
    start = threading.Barrier(len(plans))
    errors: list[str] = []

    def run(plan: list[Case]) -> None:
        start.wait()
        for case in plan:
            got = _call(case)
            if not _same(got, want_small if case == small else expected[case]):
                errors.append(f"{case} differs")

    threads = [threading.Thread(target=run, args=(plan,), daemon=True) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "threads still running"
    assert errors == []


_LAYER_CHILD = """
import os, signal, numpy as np
import generated.basic_lstm as m
from cellgen.runtime import pool
params = m.init_params(64, 128, seed=1)
x = np.random.default_rng(0).standard_normal((8, 512, 64)).astype(np.float32)
out, _ = m.dynamic_rnn(params, x)
pid = os.fork()
if pid == 0:
    signal.alarm(120)
    got, _ = m.dynamic_rnn(params, x)
    os._exit(0 if np.array_equal(got, out) else 3)
print(pool.layer(), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.parametrize("user_layer", [None, "omp", "workqueue"])
def test_threading_layer_is_chosen_unless_the_user_chose_one(user_layer: str | None) -> None:
    """A fresh process gets omp (or workqueue where no OpenMP loads), never tbb by default;
    NUMBA_THREADING_LAYER is respected; on either layer a forked child computes the same
    (under omp on one thread, under workqueue on all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    if user_layer:
        env["NUMBA_THREADING_LAYER"] = user_layer
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _LAYER_CHILD], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    layer, child = done.stdout.split()
    assert child == "0", done.stderr
    assert layer == user_layer if user_layer else layer in pool.PRIORITY[:2]


def test_this_file_on_the_workqueue_layer(tmp_path) -> None:
    """The tests above once more in a process on the other fork-safe-by-design layer: its
    children run the parallel kernels, and any two regions at once would abort the process."""
    if pool.layer() == "workqueue" or os.environ.get("CELLGEN_TEST_NESTED"):
        pytest.skip("this process already runs on workqueue")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", CELLGEN_TEST_NESTED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "not layer"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3 * TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_forked_child_of_an_omp_parent_runs_serially(monkeypatch) -> None:
    """The rule itself: in the child of a GNU OpenMP pool no kernel may start a region."""
    monkeypatch.setattr(pool, "_serial_only", True)
    assert pool.max_threads() == 1
    assert gemm.threads_for_steps(64, 100, 1 << 20) == 1
    assert gemm.threads_for(64, 1 << 20) == 1


def test_layer_priority_puts_tbb_last() -> None:
    from numba.core import config

    if not pool.user_chose_layer():
        assert list(config.THREADING_LAYER_PRIORITY) == pool.PRIORITY
    assert pool.PRIORITY[-1] == "tbb"


def test_regions_of_worker_threads_start_on_one_thread() -> None:
    """GNU OpenMP keeps a team per OS thread that starts regions: every Python thread but the main
    one hands its region to the one region thread (pool.parallel), errors come back to the caller."""
    names: list[str] = []
    workers = [threading.Thread(target=lambda: names.append(pool.parallel(lambda: threading.current_thread().name)))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(TIMEOUT)
    assert names == ["cellgen-parallel-region"] * 4
    assert pool.parallel(lambda: threading.current_thread().name) == threading.main_thread().name

    def fails() -> None:
        raise ZeroDivisionError("inside the region")

    raised: list[BaseException] = []

    def call() -> None:
        try:
            pool.parallel(fails)
        except ZeroDivisionError as exc:
            raised.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(TIMEOUT)
    assert len(raised) == 1 and str(raised[0]) == "inside the region"
