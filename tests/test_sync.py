"""cellgen.backends.cpu.sync: the barrier keeps threads in lockstep; a rendezvous that not every
thread reaches is called off, and a generated kernel then runs its loop on one thread."""

from __future__ import annotations

import threading

import numba
import numpy as np
import references as ref
from numba import njit

from cellgen.backends.cpu import gemm, sync


@njit(nogil=True)
def _lockstep(q, nth, flags, seen, rounds):
    """Each round: thread q writes its flag, barrier, reads every flag, barrier."""
    if not sync.rendezvous(flags[nth:], nth):
        return
    passed = 0
    for r in range(rounds):
        flags[q] = r
        passed = sync.barrier(flags[nth:], nth, passed)
        for other in range(nth):
            if flags[other] != r:
                seen[q] += 1  # a flag of the wrong round: the barrier let someone through early
        passed = sync.barrier(flags[nth:], nth, passed)


def test_barrier_keeps_threads_in_lockstep() -> None:
    nth, rounds = 3, 2000
    flags = np.zeros(nth + sync.SYNC_WORDS, dtype=np.int64)
    seen = np.zeros(nth, dtype=np.int64)
    _lockstep(np.int64(0), np.int64(1), np.zeros(1 + sync.SYNC_WORDS, np.int64), seen, 1)  # compile first
    workers = [threading.Thread(target=_lockstep, args=(np.int64(q), np.int64(nth), flags, seen, rounds))
               for q in range(nth)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    assert seen.tolist() == [0] * nth
    assert flags[nth] == 2 * rounds * nth  # every thread passed every barrier
    assert not sync.called_off(flags[nth:])


def test_rendezvous_alone_is_called_off() -> None:
    """One thread waiting for a second that never comes gives up, and so does any latecomer."""
    words = np.zeros(sync.SYNC_WORDS, dtype=np.int64)
    assert not sync.rendezvous(words, np.int64(2))
    assert sync.called_off(words)
    assert not sync.rendezvous(words, np.int64(2))  # a late thread sees the call-off
    assert sync.rendezvous(np.zeros(sync.SYNC_WORDS, dtype=np.int64), np.int64(1))


def test_kernel_falls_back_to_one_thread_when_threads_do_not_all_run(monkeypatch) -> None:
    """With a pool of one Numba thread, a two-way parallel region runs its iterations one after
    the other: the rendezvous is called off and the loop runs on one thread, still correct."""
    import generated.basic_lstm as m

    rng = np.random.default_rng(0)
    params = ref.random_params("basic_lstm", 5, 4, rng, np.float64)
    inputs = rng.standard_normal((3, 6, 5))
    outcomes = []
    real = sync.called_off

    def record(words):
        outcomes.append(bool(real(words)))
        return outcomes[-1]

    monkeypatch.setattr(gemm, "threads_for_steps", lambda rows, steps, work: 2)
    monkeypatch.setattr(sync, "called_off", record)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        out, state = m.dynamic_rnn(params, inputs)
    finally:
        numba.set_num_threads(before)
    want_out, want_state = ref.dynamic_rnn("basic_lstm", params, inputs)
    assert outcomes == [True]
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(state, want_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@njit(nogil=True)
def _mark(q, nth, marks, scale):
    marks[q] = (q + 1) * scale


@njit(parallel=sync.PRANGE_ONLY, nogil=True)
def _region(thread, nth, marks, scale):
    for q in numba.prange(nth):
        thread(np.int64(q), nth, marks, scale)


def test_thread_function_runs_in_a_parallel_region_and_is_memoized_by_argument_types() -> None:
    marks = np.zeros(3, dtype=np.float32)
    fn = sync.thread_function(_mark, 3, marks, 2.0)
    assert numba.typeof(fn) == numba.types.FunctionType(
        numba.types.void(numba.types.int64, numba.types.int64, numba.typeof(marks), numba.types.float64))
    _region(fn, 3, marks, 2.0)
    np.testing.assert_array_equal(marks, [2.0, 4.0, 6.0])
    assert sync.thread_function(_mark, 2, np.zeros(5, dtype=np.float32), 1.0) is fn  # same types
    other = sync.thread_function(_mark, 3, np.zeros(3), 2.0)  # float64 marks: another overload
    assert other is not fn
    assert sync.thread_function(_mark, 3, np.zeros(3, dtype=np.float32)[::2], 2.0) is not fn  # strided
