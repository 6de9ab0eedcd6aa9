"""Stage 5a (module texts -> verified module texts): every generated module compiles and imports.

``build`` calls :func:`verify` before it writes anything: each text is compiled in process
(``compile(text, name, "exec")``), then every module not verified before is imported in ONE
subprocess, from a temporary copy of the output folder under a package name of its own (the
real ``generated`` package is never imported). A module that cannot be imported is a
:class:`SpecError` naming its spec, so it is never written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cellgen.frontend.spec import SpecError

#: The package the subprocess imports the modules from (inside a temporary folder).
PACKAGE = "_cellgen_verify"
#: Seconds the import subprocess may take (it imports numba once, then every module).
IMPORT_TIMEOUT = 300.0
#: sha256 of texts this process has seen import cleanly: a rebuild does not import them again.
_VERIFIED: set[str] = set()

_IMPORT_SCRIPT = """
import importlib, json, sys, traceback
sys.path[:0] = [sys.argv[1], sys.argv[2]]
results = {}
for name in json.loads(sys.argv[3]):
    try:
        importlib.import_module(sys.argv[4] + "." + name)
        results[name] = None
    except BaseException as exc:
        frames = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(name + ".py")]
        line = frames[-1] if frames else getattr(exc, "lineno", None)
        results[name] = f"{type(exc).__name__}: {exc}" + (f" (line {line} of the module)" if line else "")
print("\\n" + json.dumps(results))
"""


@dataclass(frozen=True)
class Module:
    """One generated module before it is written: its spec, its name and its text."""

    spec_path: Path
    name: str
    text: str


def verify(modules: list[Module], out_dir: Path) -> None:
    """Raise SpecError for the first module that does not compile or import."""
    for m in modules:
        _compile(m)
    todo = [m for m in modules if _digest(m.text) not in _VERIFIED]
    if not todo:
        return
    errors = _import_all(todo, out_dir)
    for m in todo:
        if errors.get(m.name) is not None:
            raise _failure(m, f"cannot be imported: {errors[m.name]}")
        _VERIFIED.add(_digest(m.text))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _failure(m: Module, problem: str) -> SpecError:
    return SpecError(m.spec_path, 0, "generated module", f"{m.name}.py {problem}; nothing was written "
                     "(a bug in cellgen or a name it does not support yet)")


def _compile(m: Module) -> None:
    try:
        compile(m.text, f"{m.name}.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:  # a SyntaxError names the module's line; ValueError: a NUL byte
        raise _failure(m, f"does not compile: {type(exc).__name__}: {exc}") from None


def _import_all(modules: list[Module], out_dir: Path) -> dict[str, str | None]:
    """Import every module in one subprocess; name -> None (imported) or the error's line."""
    with tempfile.TemporaryDirectory(prefix="cellgen-verify-") as tmp:
        package = Path(tmp) / PACKAGE
        _copy_folder(out_dir, package)
        for m in modules:
            (package / f"{m.name}.py").write_text(m.text, encoding="utf-8")
        root = str(Path(__file__).resolve().parents[2])  # the cellgen that is building
        names = json.dumps([m.name for m in modules])
        try:
            proc = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT, tmp, root, names, PACKAGE],
                                  capture_output=True, text=True, cwd=tmp, timeout=IMPORT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise _failure(modules[0], f"and the others of this build did not import within {IMPORT_TIMEOUT:g} s") \
                from None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise _failure(modules[0], f"and the others of this build: the import check failed ({tail})") from None


def _copy_folder(out_dir: Path, package: Path) -> None:
    """The output folder's modules (not its caches) under ``package``, with an empty ``__init__.py``."""
    package.mkdir()
    if out_dir.is_dir():
        for f in out_dir.glob("*.py"):
            if f.is_file():
                shutil.copyfile(f, package / f.name)
    (package / "__init__.py").write_text("")
