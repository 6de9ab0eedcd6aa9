"""Threads of the CPU kernels: one parallel region per call, a barrier per phase.

A generated CPU kernel starts its threads ONCE per call (``for q in prange(nth)``); thread
``q`` then runs every time step itself, its share of each GEMM and each epilogue, and the
threads meet at :func:`barrier` between phases (a GEMM reads what every thread's epilogue
wrote). A Numba parallel launch costs about 1.5 us here, a barrier about 0.07 us, and the
kernel compiles one small parallel region instead of two per recurrent stage.

The parallel region calls the thread function as a first-class function
(:func:`thread_function`): an indirect call, so Numba does not link the thread function's
code into the parallel region, where its parfor lowering would optimize and compile it
again at each of its four wrapper levels (measured: the lstm spec's first call compiled in
2.6 s instead of 4.3 s).

The barrier is correct only if all ``nth`` iterations of the ``prange`` run at the same time.
Numba's ``omp`` and ``workqueue`` layers give each iteration its own thread; a work-stealing
layer (``tbb``) or a nested parallel region may run them one after another, which would wait
forever. So every thread first calls :func:`rendezvous`: it succeeds only when all ``nth``
threads have arrived; if they do not arrive within :data:`RENDEZVOUS_SPINS` waits, it fails
for every thread (before any of them wrote anything) and the kernel runs the loop on one
thread instead (same results: they do not depend on the thread count).

The ``sync`` array is ``int64[SYNC_WORDS]``, zeroed per call: word 0 counts barrier
arrivals, word :data:`_MEET` counts rendezvous arrivals (their own cache lines).
"""

from __future__ import annotations

import sys

from collections.abc import Callable
from typing import Any

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import njit, typeof, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils
from numba.core.types import CompileResultWAP
from numba.extending import intrinsic, typeof_impl

#: ``parallel=`` of a kernel whose only parallel construct is one explicit ``prange``: Numba's
#: other parfor conversions (array expressions, reductions, fusion) find nothing there but
#: cost ~0.2 s of compile time.
PRANGE_ONLY = {"prange": True, "comprehension": False, "numpy": False, "reduction": False,
               "inplace_binop": False, "setitem": False, "stencil": False, "fusion": False}

#: int64 words of a kernel's ``sync`` array.
SYNC_WORDS = 16
_MEET = 8
#: busy-wait iterations (with ``pause``) before each wait also yields the core.
SPIN_BEFORE_YIELD = 2000
#: waits after which a rendezvous that not every thread reached is called off.
RENDEZVOUS_SPINS = 100_000
_ABORTED = -(1 << 40)

_X86 = llb.get_process_triple().startswith(("x86_64", "i386", "i686"))
_HAS_SCHED_YIELD = sys.platform != "win32"
_I64P = ir.IntType(64).as_pointer()


@intrinsic
def _atomic_add(typingctx, addr, value):
    """``old = *addr; *addr += value`` atomically (sequentially consistent); returns old."""
    sig = types.int64(types.uintp, types.int64)

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", builder.inttoptr(args[0], _I64P), args[1], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, addr):
    """``*addr`` with acquire ordering."""
    sig = types.int64(types.uintp)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(builder.inttoptr(args[0], _I64P), "acquire", 8)

    return sig, codegen


@intrinsic
def _compare_exchange(typingctx, addr, expected, new):
    """``if *addr == expected: *addr = new`` atomically; True if it stored."""
    sig = types.boolean(types.uintp, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        pair = builder.cmpxchg(builder.inttoptr(args[0], _I64P), args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return sig, codegen


@intrinsic
def _relax(typingctx, spins):
    """One wait of a spin loop: ``pause`` on x86; past SPIN_BEFORE_YIELD waits, ``sched_yield()``."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        if _X86:
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                   "llvm.x86.sse2.pause")
            builder.call(pause, [])
        if _HAS_SCHED_YIELD:
            late = builder.icmp_signed(">", args[0], ir.Constant(ir.IntType(64), SPIN_BEFORE_YIELD))
            with builder.if_then(late, likely=False):
                yield_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                          "sched_yield")
                builder.call(yield_fn, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def rendezvous(sync, nth):
    """True once all ``nth`` threads are running; False for every thread if they were not all
    running within RENDEZVOUS_SPINS waits (the caller then returns without touching anything)."""
    if nth == 1:
        return True
    addr = sync.ctypes.data + _MEET * 8
    if _atomic_add(addr, 1) < 0:
        return False
    spins = 0
    while True:
        seen = _atomic_load(addr)
        if seen >= nth:
            return True
        if seen < 0:
            return False
        spins += 1
        if spins > RENDEZVOUS_SPINS and _compare_exchange(addr, seen, _ABORTED):
            return False
        _relax(spins)


@njit(cache=True, nogil=True)
def called_off(sync):
    """True if the rendezvous of this ``sync`` array failed (the kernel then runs on one thread)."""
    return sync[_MEET] < 0


@njit(cache=True, nogil=True)
def barrier(sync, nth, passed):
    """Wait until all ``nth`` threads reach their ``passed + 1``-th barrier; returns ``passed + 1``.

    Thread-local ``passed`` counts the barriers this thread has passed (all threads pass the
    same sequence), so the shared counter never needs a reset within a call.
    """
    if nth == 1:
        return passed + 1
    addr = sync.ctypes.data
    target = nth * (passed + 1)
    _atomic_add(addr, 1)
    spins = 0
    while _atomic_load(addr) < target:
        spins += 1
        _relax(spins)
    return passed + 1


class ThreadFunction(CompileResultWAP):
    """A compiled overload as a first-class function value, with its Numba type made once:
    Numba's generic ``typeof`` of a first-class function builds a new FunctionType per call
    (~14 us), this one is a lookup."""

    def __init__(self, cres) -> None:
        super().__init__(cres)
        self.numba_type = types.FunctionType(cres.signature)


@typeof_impl.register(ThreadFunction)
def _typeof_thread_function(val: ThreadFunction, c) -> types.FunctionType:
    return val.numba_type


#: (thread function, argument fingerprints) -> its compiled first-class function
_THREAD_FUNCTIONS: dict[tuple, ThreadFunction] = {}


def thread_function(dispatcher: Callable, *args: Any) -> ThreadFunction:
    """``dispatcher`` compiled for ``(q: int64, *args)``, as a first-class function value.

    A kernel's parallel region takes it as an argument and calls ``thread(q, *args)``:
    Numba compiles that as an indirect call through the function's C wrapper, so the thread
    function is compiled (or loaded from the on-disk cache) once, on its own. Memoized by the
    arguments' type fingerprints (Numba's dispatch keys, ~0.1 us each) and alignment.
    """
    key = (dispatcher, *map(compute_fingerprint, args),
           *(a.flags.aligned for a in args if isinstance(a, np.ndarray)))
    fn = _THREAD_FUNCTIONS.get(key)
    if fn is None:
        argtypes = (types.int64, *map(typeof, args))
        dispatcher.compile(argtypes)
        fn = _THREAD_FUNCTIONS[key] = ThreadFunction(dispatcher.overloads[argtypes])
    return fn


def compile_shared() -> None:
    """Compile (or load from the on-disk cache) what every generated kernel calls here."""
    sync = np.zeros(SYNC_WORDS, dtype=np.int64)
    one, zero = np.int64(1), np.int64(0)
    rendezvous(sync, one)
    barrier(sync, one, zero)
    called_off(sync)
