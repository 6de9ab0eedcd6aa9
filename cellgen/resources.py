"""Where cellgen's own files are: its templates, the shipped specs and their generated modules.

Two layouts, and nothing else in cellgen knows either:

* **installed** (from a wheel or an sdist): package data inside the package, ``cellgen/templates/``,
  ``cellgen/specs/`` and ``cellgen/cells/`` (pyproject.toml's ``package-dir`` maps the repository's
  top-level ``templates/``, ``specs/`` and ``generated/`` there; the wheel has no top-level
  ``generated`` or ``templates`` that could shadow a user's own);
* **a checkout** (an editable install, or the repository on ``sys.path``): the repository's
  top-level ``templates/``, ``specs/`` and ``generated/``.

Installed, the shipped modules are imported as ``cellgen.cells.<name>`` (:func:`import_shipped`),
never as ``generated.<name>``, which is the user's. In a checkout ``generated/`` is the package
``generated`` of the repository's tests, and :func:`cellgen.load` never imports it (a file imported
under two module names would share one Numba cache that records only one of them).

:func:`check_out_dir` is the rule of every build: cellgen never writes into its own package or into
a ``site-packages`` folder.
"""

from __future__ import annotations

import importlib
import site
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from cellgen import backends

#: The cellgen package folder (``.../site-packages/cellgen`` or ``<checkout>/cellgen``).
PACKAGE = Path(__file__).resolve().parent
#: The folder above it: the checkout's root, or ``site-packages`` when installed.
ROOT = PACKAGE.parent
#: The package the shipped generated modules are imported under.
CELLS_PACKAGE = "cellgen.cells"
#: The main template: a folder that holds it is the templates folder.
MAIN_TEMPLATE = "module.py.j2"


class ResourceError(RuntimeError):
    """cellgen's own files are missing (a broken install)."""


def installed() -> bool:
    """True when cellgen runs from an installed package (its data inside ``cellgen/``)."""
    return (PACKAGE / "templates" / MAIN_TEMPLATE).is_file()


def _folder(installed_name: str, checkout_name: str) -> Path:
    if installed():
        return PACKAGE / installed_name
    if (ROOT / "templates" / MAIN_TEMPLATE).is_file():
        return ROOT / checkout_name
    raise ResourceError(f"cellgen's templates are missing: neither {PACKAGE / 'templates'} (an installed cellgen) "
                        f"nor {ROOT / 'templates'} (a checkout) holds {MAIN_TEMPLATE}; reinstall cellgen")


def templates_dir() -> Path:
    """The folder of ``module.py.j2`` and ``<backend>/kernels.py.j2``."""
    return _folder("templates", "templates")


def specs_dir() -> Path:
    """The shipped spec files (``lstm.py``, ``gru.py``, ...)."""
    return _folder("specs", "specs")


def cells_dir() -> Path:
    """The shipped specs' generated modules (the checkout's ``generated/``)."""
    return _folder("cells", "generated")


def shipped_specs() -> dict[str, Path]:
    """Every shipped cell's name and spec file (a shipped spec's cell name is its file's stem)."""
    return {p.stem: p for p in sorted(specs_dir().glob("*.py")) if not p.name.startswith("_")}


def import_shipped(name: str) -> ModuleType:
    """``cellgen.cells.<name>`` of the installed package: a shipped cell's generated module (no check
    that it is fresh: :func:`cellgen.load` checks)."""
    if not installed():
        raise ResourceError(f"{CELLS_PACKAGE} exists in an installed cellgen only; in a checkout, import "
                            f"generated.{name} from the repository's root or call cellgen.load({name!r})")
    return importlib.import_module(f"{CELLS_PACKAGE}.{name}")


# -- where a build may write ---------------------------------------------------------------------

def protected_dirs() -> list[Path]:
    """Folders no build writes into: cellgen's own package and every ``site-packages`` folder."""
    found = [PACKAGE]
    found += [Path(p) for p in getattr(site, "getsitepackages", list)()]  # an old virtualenv's site has none
    found += [Path(site.getusersitepackages())]
    found += [Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")]
    found += [Path(p) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


def check_out_dir(out_dir: Path) -> None:
    """Raise ValueError when ``out_dir`` is inside cellgen's package or a ``site-packages`` folder."""
    target = Path(out_dir).resolve()
    for folder in protected_dirs():
        if target == folder or folder in target.parents:
            what = "cellgen's own package" if folder == PACKAGE else "a site-packages folder"
            raise ValueError(f"refusing to write generated modules into {target}: it is inside {what} ({folder}); "
                             "run `cellgen build` from your project's folder (it writes ./generated) or pass "
                             "--out DIR")


def template_folders(main: Path) -> list[Path]:
    """Where templates are found: cellgen's own folder ``main`` (:func:`templates_dir`), then each
    registered backend's own (if any)."""
    own = [Path(b.templates) for b in backends.REGISTRY.values() if b.templates is not None]
    return [main, *dict.fromkeys(own)]
