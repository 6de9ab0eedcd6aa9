"""``cellgen.load(name_or_path)``: a cell's generated module, ready to call, without a build step.

* ``cellgen.load("lstm")``: a shipped cell (``cellgen.resources.shipped_specs()``), imported as
  ``cellgen.cells.lstm`` from the installed package. Its ``# key:`` line is checked against the key
  its shipped spec has under this cellgen first: a stale module is never imported; a fresh one is
  built from the shipped spec instead (a :class:`StaleCellWarning` says so). In a checkout the
  shipped spec is loaded as a path (below): the repository's ``generated/`` is the package
  ``generated`` of its tests, and a file must be imported under one module name only, because a
  Numba cache entry records the name it was compiled under (loading it under another name imports
  that one, which fails where it is not importable).
* ``cellgen.load("path/to/spec.py")``: the module of that spec file, built by :func:`cellgen.build.build`
  (verified, all or nothing) into the cache folder ``<cache>/<name>-<digest>/`` (``<digest>``:
  sha256 of the module text, which holds the build key and the spec's path) and imported under the
  name ``_cellgen_<name>_<digest>``, never ``generated.<name>``. A later process finds the file
  unchanged and does not build or touch it, so Numba's on-disk cache (``__pycache__`` beside it)
  stays valid.

``<cache>`` is ``$CELLGEN_CACHE_DIR``, else the user's cache folder (``$XDG_CACHE_HOME/cellgen`` or
``~/.cache/cellgen``; ``~/Library/Caches/cellgen`` on macOS, ``%LOCALAPPDATA%\\cellgen\\Cache`` on
Windows). Modules are memoized in the process: a second ``load`` of the same name, or of an unchanged
spec file, returns the same module object. A spec file is trusted code: loading it runs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

from cellgen import resources

#: The environment variable that names the cache folder.
CACHE_ENV = "CELLGEN_CACHE_DIR"

_LOADED: dict[object, ModuleType] = {}
_LOCK = threading.RLock()


class StaleCellWarning(UserWarning):
    """A shipped module's key differs from what its spec builds now; a fresh build is used instead."""


def cache_dir() -> Path:
    """Where :func:`load` builds spec files: ``$CELLGEN_CACHE_DIR`` or the platform's user cache folder."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "cellgen" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "cellgen"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cellgen"


def load(cell: str | os.PathLike[str], *, timeout: float | None = None) -> ModuleType:
    """The generated module of a shipped cell (by name, ``"lstm"``) or of a spec file (by path).

    A name is a Python identifier (``"gru"``); anything else (``"myqrnn.py"``, a ``Path``) is a
    spec file's path. ``timeout``: seconds a spec file may run (default: the build's).
    """
    with _LOCK:
        if isinstance(cell, str) and cell.isidentifier():
            return _load_shipped(cell, timeout)
        return _load_path(Path(cell), timeout)


def _timeout(timeout: float | None) -> float | None:
    if timeout is not None:
        return timeout
    from cellgen.frontend.spec import DEFAULT_TIMEOUT

    return DEFAULT_TIMEOUT


def _load_shipped(name: str, timeout: float | None) -> ModuleType:
    memo = ("shipped", name)
    if memo in _LOADED:
        return _LOADED[memo]
    specs = resources.shipped_specs()
    if name not in specs:
        raise ValueError(f"no shipped cell named {name!r}; the shipped cells are {', '.join(specs)} "
                         f"(to load a spec file, pass its path, e.g. {name + '.py'!r})")
    spec_path = specs[name]
    if not resources.installed():
        module = _LOADED[memo] = _load_path(spec_path, timeout)
        return module
    from cellgen.build import spec_key
    from cellgen.frontend.spec import load_spec

    want = spec_key(load_spec(spec_path, _timeout(timeout)))
    target = resources.cells_dir() / f"{name}.py"
    have = _header_key(target)
    if have == want:
        module = resources.import_shipped(name)
    else:
        why = "is missing" if have is None else f"has key {have[:16]}..., its spec builds {want[:16]}... now"
        warnings.warn(f"cellgen.load({name!r}): the shipped module {target} {why} (it was built by another "
                      f"cellgen); using a fresh build of {spec_path} instead", StaleCellWarning, stacklevel=3)
        module = _load_path(spec_path, timeout)
    _LOADED[memo] = module
    return module


def _header_key(target: Path) -> str | None:
    """The ``# key: <sha256>`` of a generated file's first lines; None if there is none."""
    try:
        with target.open(encoding="utf-8") as fh:
            head = [fh.readline() for _ in range(3)]
    except (OSError, UnicodeDecodeError):
        return None
    for line in head:
        if line.startswith("# key: "):
            return line[len("# key: "):].strip()
    return None


def _load_path(path: Path, timeout: float | None) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"cellgen.load: no spec file {path} (a shipped cell is loaded by its name: "
                                f"{', '.join(resources.shipped_specs())})")
    st = path.stat()
    memo = ("path", str(path.resolve()), st.st_mtime_ns, st.st_size)
    if memo in _LOADED:
        return _LOADED[memo]
    from cellgen.build import build, generate

    name, text = generate(path, _timeout(timeout))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    folder = cache_dir() / f"{name}-{digest}"
    target = folder / f"{name}.py"
    if not _same_text(target, text):
        (result,) = build([path], out_dir=folder, timeout=_timeout(timeout))
        target = result.target
    module = _import_file(f"_cellgen_{name}_{digest}", target)
    _LOADED[memo] = module
    return module


def _same_text(target: Path, text: str) -> bool:
    try:
        return target.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def _import_file(module_name: str, target: Path) -> ModuleType:
    """Import ``target`` as ``module_name`` (registered in ``sys.modules``, as pickling a State needs)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
