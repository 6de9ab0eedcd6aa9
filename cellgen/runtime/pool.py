"""The process's CPU thread pool: which threading layer, one parallel region at a time, fork.

**Layer.** Generated CPU kernels run their time loop in one Numba parallel region per call
(:mod:`cellgen.runtime.sync`). Importing :mod:`cellgen.runtime` asks Numba for its
``workqueue`` layer (:data:`LAYER`) before Numba starts any thread, unless the user chose a
layer (``NUMBA_THREADING_LAYER`` in the environment, ``.numba_config.yaml`` or
``numba.config.THREADING_LAYER`` set before the first parallel call): then theirs is kept.
Why ``workqueue`` (docs/architecture.md, "Processes and threads"):

* it is fork-safe: its threads are plain pthreads with a ``pthread_atfork`` handler that
  resets the pool in the child, which starts a fresh one at its first parallel call (Numba's
  ``forksafe`` choice on Linux). The ``omp`` layer (GNU OpenMP, the default where libgomp is
  installed) kills a forked child at its first parallel call once the parent has started it
  ("fork() called from a process already using GNU OpenMP"), and a fork Pool then hangs.
* it gives every iteration of ``prange(nth)`` its own thread, all running at once, so the
  step loop's barriers hold (``tbb`` is work-stealing: it ran both iterations of a
  ``prange(2)`` on one thread here, so the rendezvous would be called off and the loop run
  serially; it is also not installed with Numba's wheels).
* it does not load libgomp, which slowed a PyTorch in the same process sixfold.

It is not thread-safe: two parallel regions launched at once from two Python threads (or a
nested one) abort the process. Every parallel region of the runtime and of the generated
kernels therefore runs under :func:`region`, one process-wide lock, which is also what keeps
concurrent callers from oversubscribing the cores (each would otherwise spin its own team of
threads on the same cores: 2-36x slower than the same calls in a row). Calls whose work is
small run their serial kernels on the calling thread and never take the lock.

**Fork.** The lock is held across ``os.fork`` (no region is in flight while the child is
made) and made anew in the child. A child of a process whose pool is GNU OpenMP (the user
chose ``omp``, or Numba's pool was started before cellgen was imported) may not start a
parallel region at all: there :func:`max_threads` is 1, so every call runs the serial
kernels (same results: they do not depend on the thread count).
"""

from __future__ import annotations

import os
import threading

import numba
from numba.core import config
from numba.np.ufunc import parallel as _numba_parallel

#: The threading layer cellgen asks Numba for when the user has not chosen one.
LAYER = "workqueue"

_lock = threading.Lock()
#: True in a forked child of a process whose Numba pool is GNU OpenMP: no parallel region.
_serial_only = False
#: Set once Numba's pool has started through :func:`max_threads`.
_started = False


def user_chose_layer() -> bool:
    """Whether the threading layer was named by the user (environment, config file or
    ``numba.config``) rather than left at Numba's ``default``."""
    return "NUMBA_THREADING_LAYER" in os.environ or str(config.THREADING_LAYER).lower() != "default"


def pool_started() -> bool:
    """Whether Numba has started its threading layer in this process (it cannot change then)."""
    return bool(getattr(_numba_parallel, "_is_initialized", False))


def choose_layer() -> None:
    """Ask Numba for :data:`LAYER` unless the user chose a layer or the pool already runs.

    Called when :mod:`cellgen.runtime` is imported and again before the pool's first start
    (Numba reloads its config from the environment when a ``NUMBA_*`` variable changed).
    """
    if not pool_started() and not user_chose_layer():
        config.THREADING_LAYER = LAYER


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


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock, _serial_only
    _lock = threading.Lock()
    if pool_started() and getattr(_numba_parallel, "_threading_layer", None) == "omp":
        _serial_only = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)

choose_layer()
