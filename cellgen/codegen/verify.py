"""Stage 5a (module texts -> verified module texts): every generated module compiles and imports.

``build`` calls :func:`verify` before it writes anything: each text is compiled in process
(``compile(text, name, "exec")``), then every module not verified before is imported from a
temporary copy of the output folder under a package name of its own (the real ``generated``
package is never imported), in a subprocess: the building process never imports a module it has
not verified. A module that cannot be imported is a :class:`SpecError` naming its spec, so it is
never written.

The subprocess is an import worker that lives as long as the building process: it imports numba
and cellgen once (about 1-2 s), then each build's modules on request (milliseconds), each build
under a new package name, so one build's modules never see another's. A worker that dies or
stops answering within :data:`IMPORT_TIMEOUT` is killed, the build fails with what it printed,
and the next build starts a new one; so does a build after the environment changed (PYTHONPATH,
``NUMBA_ENABLE_CUDASIM``...): the modules import as in a process started now.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cellgen.frontend.spec import SpecError

#: The prefix of the package names the worker imports the modules under (inside a temporary folder).
PACKAGE = "_cellgen_verify"
#: Seconds one import request may take (the first imports numba, then every module).
IMPORT_TIMEOUT = 300.0
#: sha256 of texts this process has seen import cleanly: a rebuild does not import them again.
_VERIFIED: set[str] = set()

#: The worker: one JSON request per line on stdin ({"folder", "package", "names"}), one JSON answer
#: per line on its stdout (name -> None or the error); whatever a module prints goes to stderr.
_WORKER_SCRIPT = """
import importlib, json, sys, traceback
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
sys.path.insert(0, sys.argv[1])  # the cellgen that is building
answers, sys.stdout = sys.stdout, sys.stderr
import numba  # noqa: F401  (what every generated module imports: once, here)
for line in sys.stdin:
    request = json.loads(line)
    sys.path.insert(0, request["folder"])
    importlib.invalidate_caches()
    results = {}
    for name in request["names"]:
        try:
            importlib.import_module(request["package"] + "." + name)
            results[name] = None
        except BaseException as exc:
            frames = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(name + ".py")]
            line_no = frames[-1] if frames else getattr(exc, "lineno", None)
            results[name] = f"{type(exc).__name__}: {exc}" + (f" (line {line_no} of the module)" if line_no else "")
    sys.path.remove(request["folder"])
    for key in [k for k in sys.modules if k == request["package"] or k.startswith(request["package"] + ".")]:
        del sys.modules[key]
    answers.write(json.dumps(results) + "\\n")
    answers.flush()
"""


class _ImportWorker:
    """The import subprocess (started on first use, restarted after a failure), one request at a time."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.log: tempfile._TemporaryFileWrapper[str] | None = None
        self.lock = threading.Lock()
        self.packages = itertools.count()
        self.env: dict[str, str] = {}  # the environment it started with (PYTHONPATH, NUMBA_*...)

    def _start(self) -> subprocess.Popen[str]:
        root = str(Path(__file__).resolve().parents[2])  # the cellgen that is building
        self.env = dict(os.environ)
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115 - the worker's life
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", _WORKER_SCRIPT, root], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=tempfile.gettempdir())
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
        if self.log is not None:
            self.log.close()
        self.proc = self.log = None

    def _tail(self) -> str:
        if self.log is None:
            return "no output"
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        return lines[-1] if lines else "no output"

    def new_package(self) -> str:
        """A package name no earlier request of this process used."""
        return f"{PACKAGE}{os.getpid()}_{next(self.packages)}"

    def import_all(self, folder: str, package: str, names: list[str]) -> dict[str, str | None] | str:
        """Each module ``package.name`` (``package`` a folder in ``folder``) -> None (imported) or its
        error; a string when the worker failed."""
        with self.lock:
            if self.proc is not None and (self.proc.poll() is not None or self.env != os.environ):
                self.stop()  # dead, or the environment changed since it started: a build imports as a new process would
            proc = self.proc or self._start()
            try:
                proc.stdin.write(json.dumps({"folder": folder, "package": package, "names": names}) + "\n")
                proc.stdin.flush()
                with selectors.DefaultSelector() as sel:
                    sel.register(proc.stdout, selectors.EVENT_READ)
                    ready = sel.select(IMPORT_TIMEOUT)
                answer = proc.stdout.readline() if ready else ""
            except (BrokenPipeError, OSError):
                answer = ""
            if not ready:
                self.stop()
                return f"did not import within {IMPORT_TIMEOUT:g} s"
            try:
                return json.loads(answer)
            except ValueError:
                tail = self._tail()
                self.stop()
                return f"the import check failed ({tail})"


_WORKER = _ImportWorker()
atexit.register(_WORKER.stop)


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
    """Import every module in the import worker; name -> None (imported) or the error's line."""
    with tempfile.TemporaryDirectory(prefix="cellgen-verify-") as tmp:
        name = _WORKER.new_package()
        package = Path(tmp) / name
        _copy_folder(out_dir, package)
        for m in modules:
            (package / f"{m.name}.py").write_text(m.text, encoding="utf-8")
        errors = _WORKER.import_all(tmp, name, [m.name for m in modules])
    if isinstance(errors, str):
        what = "and the others of this build " if len(modules) > 1 else ""
        raise _failure(modules[0], f"{what}could not be checked: {errors}") from None
    return errors


def _copy_folder(out_dir: Path, package: Path) -> None:
    """The output folder's modules (not its caches) under ``package``, with an empty ``__init__.py``."""
    package.mkdir()
    if out_dir.is_dir():
        for f in out_dir.glob("*.py"):
            if f.is_file():
                shutil.copyfile(f, package / f.name)
    (package / "__init__.py").write_text("")
