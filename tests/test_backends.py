"""The backend interface (cellgen.backends): one folder plus one registry entry per backend.

``test_adding_a_backend_as_the_docs_say`` follows docs/architecture.md's "How to add a backend"
step by step with a backend that lives outside cellgen; the others check that the three shipped
backends are built the same way and that the compiler's modules import each other without cycles.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import textwrap
from pathlib import Path

import numpy as np

import cellgen
from cellgen import backends, resources
from cellgen.build import build, compiler_sources, spec_key
from cellgen.codegen.render import TEMPLATES
from cellgen.frontend.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(cellgen.__file__).resolve().parent


def test_every_shipped_backend_is_a_folder_and_a_registry_entry() -> None:
    assert backends.names() == ("cpu", "cuda", "reference")
    for b in backends.REGISTRY.values():
        assert b.folder == PACKAGE / "backends" / b.name
        assert callable(importlib.import_module(f"{b.package}.context").context)
        assert (TEMPLATES / b.template).is_file() and b.template.startswith(f"{b.name}/")
        assert b.folder / "context.py" in compiler_sources().values()  # a change to it changes every key
    mod = importlib.import_module("generated.basic_rnn")
    assert tuple(mod._CELL.backends) == backends.names()


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The cellgen modules ``path`` imports (anywhere in it, at import time or in a function):
    ``from cellgen.runtime import checks`` imports the module cellgen.runtime.checks (its
    package's ``__init__`` runs first, but that is no edge of this module's)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):  # importlib.import_module("cellgen.tools.x")
            found.add(node.args[0].value)
    return {m for m in found if m in modules and m != module}


def test_the_compiler_has_no_import_cycles() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for dep in graph[name]:
            if dep in trail:
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, [*trail, dep])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


# -- the docs' recipe, step by step ----------------------------------------------------------------
CONTEXT = '''
"""The template context of the "counting" backend: facts of the plan, printed to strings."""


def context(plan):
    return {"stages": str(len(plan.gemms)), "describe": f"{len(plan.gemms)} recurrent GEMM(s)"}
'''
RUNTIME = '''
"""The "counting" backend's runtime: counts the calls, then runs the cpu backend's loop."""

CALLS = []


def run(loop, *args):
    CALLS.append(len(args))
    return loop(*args)
'''
TEMPLATE = '''
# ---- counting backend (tests/test_backends.py): {{ counting.describe }} -------------------------
from counting_backend import runtime as _rt_counting  # noqa: E402

_COUNTING_STAGES = {{ counting.stages }}


def _run_counting(packed, params, xs, lengths, states, hyper, sizes):
    """backend="counting": the cpu backend's compiled loop, counted."""
    return _rt_counting.run(_run_cpu, packed, params, xs, lengths, states, hyper, sizes)


_backend_counting = _rt.BackendRun(run=_run_counting)
'''


def test_adding_a_backend_as_the_docs_say(tmp_path: Path, monkeypatch) -> None:
    # 1. a folder: the package with its context builder and its runtime; its templates
    folder = tmp_path / "counting_backend"
    (folder / "templates" / "counting").mkdir(parents=True)
    (folder / "__init__.py").write_text('"""A backend that counts its calls."""\n')
    (folder / "context.py").write_text(textwrap.dedent(CONTEXT))
    (folder / "runtime.py").write_text(textwrap.dedent(RUNTIME))
    (folder / "templates" / "counting" / "kernels.py.j2").write_text(textwrap.dedent(TEMPLATE))
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here and in the build's import check
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    spec = REPO / "specs" / "gru.py"
    key_before = spec_key(load_spec(spec))
    # 2. one registry entry
    backend = backends.register(backends.Backend(
        "counting", "counting_backend", "counting/kernels.py.j2", "the cpu loop, counted",
        templates=str(folder / "templates")))
    try:
        assert folder / "templates" in resources.template_folders(TEMPLATES)
        assert spec_key(load_spec(spec)) != key_before  # its sources and templates are in every key
        (result,) = build([spec], tmp_path / "gen_counting")
        mod = importlib.import_module("gen_counting.gru")
        assert mod._COUNTING_STAGES == 2
        assert tuple(mod._CELL.backends) == (*backends.names()[:-1], "counting")
        params = mod.init_params(3, 5, dtype=np.float64, seed=0)
        x = np.random.default_rng(1).standard_normal((2, 4, 3))
        want, want_state = mod.dynamic_rnn(params, x, sequence_length=[4, 2], backend="reference")
        got, got_state = mod.dynamic_rnn(params, x, sequence_length=[4, 2], backend="counting")
        runtime = importlib.import_module("counting_backend.runtime")
        assert runtime.CALLS == [7]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_state.h, want_state.h, rtol=1e-12, atol=1e-12)
    finally:
        backends.unregister(backend.name)
        for name in [m for m in sys.modules if m.startswith(("counting_backend", "gen_counting"))]:
            del sys.modules[name]
    assert spec_key(load_spec(spec)) == key_before
