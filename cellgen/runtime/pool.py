"""The process's CPU thread pool: which threading layer, one parallel region at a time, fork.

**Layer.** Generated CPU kernels run their time loop in one Numba parallel region per call
(:mod:`cellgen.backends.cpu.sync`), whose barriers need every iteration of ``prange(nth)`` on its
own thread, all running at once. Importing :mod:`cellgen.runtime` sets Numba's layer
priority to :data:`PRIORITY` (``omp``, then ``workqueue``; ``tbb`` only if neither loads)
before Numba starts any thread, unless the user chose (``NUMBA_THREADING_LAYER`` or
``NUMBA_THREADING_LAYER_PRIORITY`` in the environment, ``.numba_config.yaml``, or
``numba.config`` set before the first parallel call): then theirs is kept. Measured and
compared in docs/performance.md ("Threading layer and fork"):

* ``omp`` (GNU OpenMP): a region starts in ~1.5 us; threadsafe. Not fork-safe: once the
  parent has started it, a forked child is killed at its first parallel region ("fork()
  called from a process already using GNU OpenMP"), and a fork Pool hangs.
* ``workqueue``: fork-safe (a ``pthread_atfork`` handler resets it; the child starts a fresh
  pool), but a region starts in ~100 us (its workers sleep on condition variables: +11-15%
  at S3, and a T = 1 call would pay it whole), and it is not thread-safe: two regions at once,
  or a nested one, abort the process.
* ``tbb`` is work-stealing: it ran both iterations of a ``prange(2)`` on one thread here, so
  every rendezvous would be called off and the loop run on one thread. Numba's own default
  order puts it first, so an installed ``tbb`` package would have made every kernel serial.

**Fork.** In a forked child of a process whose pool is GNU OpenMP, :func:`max_threads` is 1:
every call there runs the serial kernels on the calling thread and starts no parallel region
(same results: they do not depend on the thread count). Under ``workqueue`` a child runs
the parallel kernels. The region lock (below) is held across ``os.fork``, so no region is in
flight while the child is made, and made anew in the child.

**Threads.** Every parallel region of the runtime and of the generated kernels runs under
:func:`region`, one process-wide lock: concurrent callers take turns instead of each
spinning its own team of threads on the same cores (2-36x slower than the same calls in a
row, before), and ``workqueue`` is never entered twice at once. Calls whose work is small
run their serial kernels on the calling thread and never take the lock.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numba
from numba.core import config
from numba.np.ufunc import parallel as _numba_parallel

#: Numba's threading layer priority cellgen sets when the user has not chosen a layer.
PRIORITY = ["omp", "workqueue", "tbb"]
#: Numba's own default priority and layer (what "not chosen" looks like).
_NUMBA_PRIORITY = ["tbb", "omp", "workqueue"]

_lock = threading.Lock()
#: True in a forked child of a process whose Numba pool is GNU OpenMP: no parallel region.
_serial_only = False
#: Set once Numba's pool has started through :func:`max_threads`.
_started = False


def user_chose_layer() -> bool:
    """Whether the threading layer or its priority was set by the user (environment, config
    file or ``numba.config``) rather than left at Numba's defaults."""
    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return True
    priority = list(config.THREADING_LAYER_PRIORITY)
    return str(config.THREADING_LAYER).lower() != "default" or priority not in (_NUMBA_PRIORITY, PRIORITY)


def pool_started() -> bool:
    """Whether Numba has started its threading layer in this process (it cannot change then)."""
    return bool(getattr(_numba_parallel, "_is_initialized", False))


def choose_layer() -> None:
    """Set Numba's layer priority to :data:`PRIORITY` unless the user chose or the pool runs.

    Called when :mod:`cellgen.runtime` is imported and again before the pool's first start
    (Numba reloads its config from the environment when a ``NUMBA_*`` variable changed).
    """
    if not pool_started() and not user_chose_layer():
        config.THREADING_LAYER_PRIORITY = list(PRIORITY)


def layer() -> str:
    """The threading layer in use (starts Numba's pool if it has not started)."""
    max_threads()
    return str(numba.threading_layer())


def max_threads() -> int:
    """Threads one kernel call may use: Numba's thread count (``NUMBA_NUM_THREADS``,
    ``numba.set_num_threads``), or 1 in a forked child that may not start a parallel region."""
    global _started
    if _serial_only:
        return 1
    if not _started:
        choose_layer()
        _started = True
    return int(numba.get_num_threads())


def region() -> threading.Lock:
    """The process-wide lock to hold around every parallel region (``with pool.region(): ...``):
    one region at a time, in whichever Python thread. Call it each time (a forked child has a
    new lock)."""
    return _lock


class _Runner:
    """One daemon thread that runs the parallel regions of every Python thread but the main one.

    GNU OpenMP keeps a team of worker threads per OS thread that starts regions, and an idle
    team spins for a while after each region: four calling threads were four teams spinning on
    two cores. Regions started from other threads all start here, so there are at most two
    teams (the main thread's and this one's), one when only worker threads call.
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="cellgen-parallel-region", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            fn, args, done, box = self.jobs.get()
            try:
                with _lock:
                    box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller, raised there
                box.append((False, exc))
            done.set()

    def call(self, fn: Callable[..., Any], args: tuple) -> Any:
        done, box = threading.Event(), []
        self.jobs.put((fn, args, done, box))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


_runner: _Runner | None = None
_runner_lock = threading.Lock()


def parallel(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a call that starts a parallel region, under the region lock (:func:`region`),
    on the main thread when called from it and otherwise on the one region thread (:class:`_Runner`):
    a caller's wait is a blocking wait (no spinning), ~17 us of hand-over for a worker thread."""
    global _runner
    if threading.current_thread() is threading.main_thread():
        with _lock:
            return fn(*args)
    if _runner is None:
        with _runner_lock:
            if _runner is None:
                _runner = _Runner()
    return _runner.call(fn, args)


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock, _serial_only, _runner, _runner_lock
    _lock = threading.Lock()
    _runner, _runner_lock = None, threading.Lock()  # the parent's region thread is not in the child
    if pool_started() and getattr(_numba_parallel, "_threading_layer", None) == "omp":
        _serial_only = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)

choose_layer()
