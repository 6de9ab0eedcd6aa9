"""Stage 5 (module text -> generated/<name>.py): keyed, atomic, write-only-when-changed files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sympy

from cellgen import __version__
from cellgen.analysis import analyse
from cellgen.passes import run_passes
from cellgen.plan import FusedPlan
from cellgen.render import render_module, templates_digest
from cellgen.spec import CellSpec, load_spec

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "generated"
#: The compiler's own stages: their source is part of every generated module's key.
COMPILER_MODULES = ("dsl", "spec", "analysis", "plan", "passes", "printing", "render", "render_cuda", "build",
                    "runtime/gemm")


@dataclass(frozen=True)
class BuildResult:
    spec_path: Path
    target: Path
    changed: bool


def compile_spec(path: str | Path) -> tuple[CellSpec, FusedPlan]:
    """spec file -> CellSpec -> FusedPlan (after the default passes)."""
    spec = load_spec(path)
    return spec, run_passes(analyse(spec))


def spec_key(spec: CellSpec) -> str:
    """sha256 over the spec's srepr, the generator version, its compiler stages and the templates."""
    h = hashlib.sha256()
    h.update(__version__.encode())
    h.update(templates_digest().encode())
    for module in COMPILER_MODULES:
        h.update((Path(__file__).parent / f"{module}.py").read_bytes())
    for part in (spec.name, spec.doc, spec.updates, spec.output, spec.linears, spec.states, spec.params,
                 spec.hypers, spec.sizes):
        h.update(sympy.srepr(part).encode() if isinstance(part, sympy.Basic) else repr(part).encode())
    return h.hexdigest()


def display_path(path: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


def generate(path: str | Path) -> tuple[str, str]:
    """(module name, module text) for one spec file."""
    spec, plan = compile_spec(path)
    return spec.name, render_module(plan, display_path(Path(path)), spec_key(spec))


def write_if_changed(target: Path, text: str) -> bool:
    """Atomic write (temp file + os.replace) only when the text differs; True if written."""
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def spec_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories into their ``*.py`` spec files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(q for q in p.glob("*.py") if not q.name.startswith("_")) if p.is_dir() else [p])
    return files


def build(paths: list[str | Path], out_dir: Path = GENERATED) -> list[BuildResult]:
    """Generate every spec first, then write: a broken spec leaves every file untouched."""
    texts = [(p, *generate(p)) for p in spec_files(paths)]
    init = out_dir / "__init__.py"
    if not init.exists():
        write_if_changed(init, '"""Generated cell modules (cellgen build). DO NOT EDIT by hand."""\n')
    return [BuildResult(p, out_dir / f"{name}.py", write_if_changed(out_dir / f"{name}.py", text))
            for p, name, text in texts]


def stale(paths: list[str | Path], out_dir: Path = GENERATED) -> list[Path]:
    """Generated files that are missing or differ from what the specs generate now."""
    result = []
    for p in spec_files(paths):
        name, text = generate(p)
        target = out_dir / f"{name}.py"
        if not target.exists() or target.read_text() != text:
            result.append(target)
    return result
