"""The backends: each is one folder here plus one :data:`REGISTRY` entry.

A backend folder ``cellgen/backends/<name>/`` holds

* ``context.py``: ``context(plan) -> dict``, the template context of its kernels (strings, ints,
  lists and dicts of those; it prints expressions with :mod:`cellgen.codegen.printing`);
* its runtime, the hand-written helpers its generated code calls (``gemm.py``, ``runtime.py``...);

and its templates are ``templates/<name>/kernels.py.j2``: they define the backend's kernels and
``_backend_<name>``, the :class:`cellgen.runtime.driver.BackendRun` the module registers (its
``run`` function, and where its arrays live). The module template includes every registered
backend's template and hands its context over under ``<name>``. Nothing else names a backend:
``dynamic_rnn(..., backend=name)``, ``cellgen bench --backend``, the build key and the tests all
read this registry (docs/architecture.md, "How to add a backend").

This module is imported by generated code (through the backends' runtimes): it imports no
compiler stage; a backend's context module is imported only when a module is rendered.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The repository's (or the installed package's) templates folder is found by cellgen.codegen.render.
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Backend:
    """One backend: its ``name`` (the ``backend=`` value), its folder's package and its template."""

    name: str
    package: str
    template: str
    description: str
    device: bool = False  # its arrays live on a device (numba.cuda), not in NumPy
    directions: tuple[str, ...] = ("forward",)  # the time loops (cellgen.ir.plan.Direction) it renders
    templates: str | None = None  # a folder of its own holding ``template`` (None: cellgen's templates/)

    def context(self, plan: Any) -> dict[str, Any]:
        """The template context of this backend's kernels for ``plan``."""
        return importlib.import_module(f"{self.package}.context").context(plan)

    @property
    def folder(self) -> Path:
        return Path(importlib.import_module(self.package).__file__).resolve().parent


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` (a module built after this includes it); a name is registered once."""
    if backend.name in REGISTRY and REGISTRY[backend.name] != backend:
        raise ValueError(f"a backend named {backend.name!r} is already registered ({REGISTRY[backend.name].package})")
    REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> Backend:
    """Remove a backend registered by :func:`register` (modules built after this leave it out)."""
    return REGISTRY.pop(name)


def names() -> tuple[str, ...]:
    """Every registered backend's name, in registration order (the first is the default)."""
    return tuple(REGISTRY)


register(Backend("cpu", "cellgen.backends.cpu", "cpu/kernels.py.j2",
                 "the whole time loop in compiled Numba code, on cellgen's packed GEMM, threaded"))
register(Backend("cuda", "cellgen.backends.cuda", "cuda/kernels.py.j2",
                 "numba.cuda kernels (a GPU, or NUMBA_ENABLE_CUDASIM=1); device arrays in and out", device=True))
register(Backend("reference", "cellgen.backends.reference", "reference/kernels.py.j2",
                 "the spec's equations unfused, one NumPy step at a time (the module's own oracle)"))
