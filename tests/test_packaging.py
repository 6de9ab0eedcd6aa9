"""cellgen as an installed library in a user's own project (issue 10, packaging).

* pyproject.toml lists every package, maps the repository's templates/, specs/ and generated/ into
  the package (cellgen/templates, cellgen/specs, cellgen/cells) and declares what cellgen imports;
* ``cellgen build`` writes ./generated of the working directory (or --out) and never into cellgen's
  package or a site-packages folder; ``cellgen.load`` by name and by path, its cache folder, a stale
  shipped module; ``cellgen run`` from the checkout;
* the end-to-end test: an sdist and a wheel built from a copy of the checkout, the wheel installed
  into a fresh venv, then in an empty project folder: ``cellgen run``, ``cellgen build myqrnn.py``,
  ``import generated.myqrnn``, ``cellgen.load("lstm")`` and ``cellgen.load("myqrnn.py")`` in one
  process, Numba's on-disk cache inside the venv's site-packages, nothing else written there.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import cellgen
from cellgen import cli, loader, resources
from cellgen.build import spec_key
from cellgen.frontend.spec import load_spec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: The distribution that provides each third-party module cellgen imports.
PROVIDERS = {"jinja2": "jinja2", "llvmlite": "llvmlite", "numba": "numba", "numpy": "numpy", "sympy": "sympy",
             "threadpoolctl": "threadpoolctl", "torch": "torch", "matplotlib": "matplotlib", "cuda": "numba-cuda",
             "ruff": "ruff", "nvidia": "nvidia-cuda-nvdisasm",  # nvidia: the namespace nvdisasm's wheel installs into
             "ml_dtypes": "ml_dtypes"}
#: Folders and modules whose imports may come from an optional extra (the CUDA backend, the tools, the torch layer).
OPTIONAL = ("cellgen/backends/cuda/", "cellgen/tools/", "cellgen/torch.py", "cellgen/torch_ops.py")

MYQRNN = '''"""A QRNN with f-pooling, the user's own cell."""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("myqrnn", doc=__doc__)
x = cell.input()
h = cell.state("h")
z_pre, f_pre = cell.linear([x], gates=("z", "f"), kernel="kernel", bias="bias")
f = sigmoid(f_pre)
new_h = f * h + (1 - f) * tanh(z_pre)
cell.update(h, new_h)
cell.output(new_h)
'''


# -- pyproject.toml ----------------------------------------------------------------------------------

def test_pyproject_lists_every_package_and_maps_the_data_folders() -> None:
    setup = PYPROJECT["tool"]["setuptools"]
    packages = set(setup["packages"])
    folders = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in (REPO / "cellgen").rglob("*.py")}
    assert folders - packages == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert setup["package-dir"] == {"cellgen.cells": "generated", "cellgen.specs": "specs",
                                    "cellgen.templates": "templates"}
    assert all(p == "cellgen" or p.startswith("cellgen.") for p in packages), "one top-level package: cellgen"
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["cellgen.templates"]
    templates = [p.relative_to(REPO / "templates").as_posix() for p in (REPO / "templates").rglob("*.j2")]
    assert templates and all(any(fnmatch.fnmatch(t, pat) and t.count("/") == pat.count("/") for pat in patterns)
                             for t in templates), "a template the wheel would not carry"


def test_pyproject_declares_every_third_party_import() -> None:
    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}

    core = names(PYPROJECT["project"]["dependencies"])
    extras = set().union(*map(names, PYPROJECT["project"]["optional-dependencies"].values()))
    for path in sorted((REPO / "cellgen").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "cellgen":
                    continue
                assert top in PROVIDERS, f"{rel} imports {module}: add its distribution to PROVIDERS and pyproject"
                optional = rel.startswith(OPTIONAL) or module.startswith("numba.cuda")
                assert PROVIDERS[top] in (core | extras if optional else core), f"{rel} imports {module}"


# -- where builds write --------------------------------------------------------------------------------

def test_build_writes_generated_of_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "myqrnn.py").write_text(MYQRNN)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["build", "myqrnn.py"]) == 0
    assert sorted(p.name for p in (tmp_path / "generated").glob("*.py")) == ["__init__.py", "myqrnn.py"]
    assert cli.main(["build", "--check", "myqrnn.py"]) == 0
    assert cli.main(["build", "myqrnn.py", "--out", "elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / "myqrnn.py").read_text() == (tmp_path / "generated" / "myqrnn.py").read_text()


@pytest.mark.parametrize("where", ["package", "site-packages"])
def test_build_refuses_cellgens_package_and_site_packages(tmp_path: Path, where: str, capsys) -> None:
    spec = tmp_path / "myqrnn.py"
    spec.write_text(MYQRNN)
    base = resources.PACKAGE if where == "package" else Path(sysconfig.get_paths()["purelib"])
    out = base / "generated_by_a_test"
    assert cli.main(["build", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refusing to write generated modules into" in err and "--out DIR" in err
    assert not out.exists()


# -- cellgen.load ----------------------------------------------------------------------------------------

def _forget_cached_modules() -> None:
    for name in [m for m in sys.modules if m.startswith("_cellgen_")]:
        del sys.modules[name]


@pytest.fixture
def fresh_load(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """An empty cache folder and no module loaded yet in this process."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(loader.CACHE_ENV, str(cache))
    monkeypatch.setattr(loader, "_LOADED", {})
    _forget_cached_modules()
    yield cache
    _forget_cached_modules()


def test_shipped_cells_are_the_shipped_specs() -> None:
    specs = resources.shipped_specs()
    assert sorted(specs) == sorted(p.stem for p in resources.cells_dir().glob("*.py") if p.stem != "__init__")
    assert resources.templates_dir() == REPO / "templates" and resources.cells_dir() == REPO / "generated"
    assert not resources.installed()  # the tests run from the checkout


def test_load_a_shipped_cell_by_name_in_the_checkout(fresh_load: Path) -> None:
    """In the checkout generated/ stays the tests' `generated` (one module name per file, for Numba's
    cache): the shipped spec is loaded like a path (installed: test_the_installed_wheel_in_an_empty_project)."""
    module = cellgen.load("qrnn_f")
    assert module.__name__.startswith("_cellgen_qrnn_f_") and Path(module.__file__).parent.parent == fresh_load
    assert Path(module.__file__).read_text() == (REPO / "generated" / "qrnn_f.py").read_text()
    assert spec_key(load_spec(REPO / "specs" / "qrnn_f.py")) == module.KEY
    assert cellgen.load("qrnn_f") is module
    assert cellgen.load(REPO / "specs" / "qrnn_f.py") is module
    assert not any(m == "cellgen.cells" or m.startswith("cellgen.cells.") for m in sys.modules)
    with pytest.raises(ValueError, match=r"no shipped cell named 'nope'; the shipped cells are .*lstm.*'nope\.py'"):
        cellgen.load("nope")
    with pytest.raises(FileNotFoundError, match="no spec file"):
        cellgen.load("nope.py")


def test_load_a_spec_file_builds_it_into_the_cache_once(fresh_load: Path, tmp_path: Path) -> None:
    spec = tmp_path / "project" / "myqrnn.py"
    spec.parent.mkdir()
    spec.write_text(MYQRNN)
    module = cellgen.load(str(spec))
    target = Path(module.__file__)
    assert target.parent.parent == fresh_load and re.fullmatch(r"myqrnn-[0-9a-f]{16}", target.parent.name)
    assert module.__name__ == f"_cellgen_myqrnn_{target.parent.name[-16:]}" and module.__name__ in sys.modules
    assert not (spec.parent / "generated").exists()
    assert cellgen.load(spec) is module
    mtime = target.stat().st_mtime_ns
    loader._LOADED.clear()
    assert cellgen.load(spec) is module and target.stat().st_mtime_ns == mtime  # found, not built again
    params = module.init_params(3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(module.dynamic_rnn(params, x)[0], module.dynamic_rnn(params, x, backend="reference")[0],
                               rtol=1e-5, atol=1e-6)
    spec.write_text(MYQRNN.replace("(1 - f) * tanh(z_pre)", "(1 - f) * z_pre"))
    changed = cellgen.load(spec)
    assert changed is not module and Path(changed.__file__).parent != target.parent


def test_a_stale_shipped_module_is_never_imported(fresh_load: Path, tmp_path: Path, monkeypatch) -> None:
    """An installed cellgen whose shipped qrnn_f.py has another key than its spec builds now."""
    cells = tmp_path / "cells"
    cells.mkdir()
    text = (REPO / "generated" / "qrnn_f.py").read_text()
    (cells / "qrnn_f.py").write_text(re.sub(r"# key: \w+", "# key: " + "0" * 64, text, count=1)
                                     + "\nraise RuntimeError('the stale module was imported')\n")
    monkeypatch.setattr(resources, "installed", lambda: True)
    monkeypatch.setattr(resources, "cells_dir", lambda: cells)
    monkeypatch.setattr(resources, "specs_dir", lambda: REPO / "specs")
    monkeypatch.setattr(resources, "import_shipped", lambda name: pytest.fail("imported the stale module"))
    with pytest.warns(loader.StaleCellWarning, match=r"cellgen.load\('qrnn_f'\): the shipped module .* has key 0000"):
        module = cellgen.load("qrnn_f")
    assert Path(module.__file__).parent.parent == fresh_load
    assert spec_key(load_spec(REPO / "specs" / "qrnn_f.py")) == module.KEY


def test_cache_dir_is_the_platform_user_cache(monkeypatch) -> None:
    monkeypatch.delenv(loader.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    if sys.platform.startswith("linux"):
        assert loader.cache_dir() == Path("/somewhere/cache/cellgen")
    monkeypatch.setenv(loader.CACHE_ENV, "/my/cache")
    assert loader.cache_dir() == Path("/my/cache")


def test_cellgen_run_from_the_checkout(fresh_load: Path) -> None:
    from cellgen.tools.demo import run_spec

    report = run_spec(str(REPO / "specs" / "qrnn_f.py"), 2, 3, 4, 5)
    assert report.startswith(f"loaded qrnn_f from {REPO / 'specs' / 'qrnn_f.py'}: {fresh_load}")


# -- the wheel in a fresh venv, in an empty project --------------------------------------------------------

USER_SCRIPT = """
import json, sys
import numpy as np
import cellgen
import generated.myqrnn as mine              # the user's own generated/, built by `cellgen build`
lstm = cellgen.load("lstm")                  # a shipped cell: no build
again = cellgen.load("myqrnn.py")            # the same spec, built into the cache
x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
params = mine.init_params(3, 4, seed=0)
a, b = mine.dynamic_rnn(params, x), again.dynamic_rnn(params, x)
p = lstm.init_params(3, 4, num_proj=2, seed=0)
cpu, ref = lstm.dynamic_rnn(p, x), lstm.dynamic_rnn(p, x, backend="reference")
print(json.dumps({
    "cellgen": cellgen.__file__, "generated": sys.modules["generated"].__file__, "mine": mine.__file__,
    "lstm": [lstm.__name__, lstm.__file__], "again": [again.__name__, again.__file__],
    "same": bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1].h, b[1].h)),
    "lstm_close": float(np.abs(cpu[0] - ref[0]).max()), "lstm_shape": list(cpu[0].shape),
    "load_is_memoized": cellgen.load("lstm") is lstm,
    "top_level": sorted(m for m in sys.modules if m.split(".")[0] in ("generated", "templates", "cells")),
}))
"""


def _deps_path_file(site_packages: Path) -> None:
    """Make cellgen's dependencies importable in the venv: their folders, by a .pth file.

    Not ``--system-site-packages``: that would run the outer environment's .pth files, the
    editable install of the checkout among them; a folder named in a .pth file has its own
    .pth files ignored, so the checkout cannot leak in.
    """
    import jinja2
    import llvmlite
    import numba
    import scipy
    import sympy
    import threadpoolctl

    folders = dict.fromkeys(str(Path(m.__file__).resolve().parent.parent)
                            for m in (jinja2, llvmlite, numba, np, scipy, sympy, threadpoolctl))
    (site_packages / "_cellgen_test_deps.pth").write_text("\n".join(folders) + "\n")


def _copy_checkout(dest: Path) -> Path:
    """The files a build of the checkout reads (no caches, no old build/ or egg-info)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "*.egg-info")
    for name in ("cellgen", "templates", "specs", "generated"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _files_outside_pycache(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.long
def test_the_installed_wheel_in_an_empty_project(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "NUMBA_CACHE_DIR", "VIRTUAL_ENV")}
    env["CELLGEN_CACHE_DIR"] = str(tmp_path / "cellgen-cache")
    # 1. an sdist of a copy of the checkout, and the wheel built from it (what `python -m build` does)
    src = _copy_checkout(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
          str(dist)], src, env)
    (sdist,) = dist.glob("cellgen-*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(sdist)], tmp_path, env)
    (wheel,) = dist.glob("cellgen-*.whl")
    names = _run([sys.executable, "-m", "zipfile", "-l", str(wheel)], tmp_path, env).stdout
    files = [line.split()[0] for line in names.splitlines()[1:]]
    assert {f.split("/")[0] for f in files} == {"cellgen", wheel.name.split("-py3")[0] + ".dist-info"}
    for name in ("cellgen/templates/module.py.j2", "cellgen/templates/cpu/kernels.py.j2",
                 "cellgen/templates/reference/kernels.py.j2", "cellgen/cells/__init__.py", "cellgen/cells/lstm.py",
                 "cellgen/specs/lstm.py", "cellgen/resources.py", "cellgen/loader.py"):
        assert name in files, name
    # 2. a fresh venv with the wheel (and cellgen's dependencies from this environment)
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    _deps_path_file(site)
    project = tmp_path / "project"
    project.mkdir()
    no_generated = "import importlib.util as u; print(u.find_spec('generated'))"
    assert _run([str(python), "-c", no_generated], project, env).stdout.split() == ["None"], \
        "a top-level `generated` is importable in the fresh venv (an old cellgen install in this environment?)"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--force-reinstall",
          str(wheel)], tmp_path, env)
    before = _files_outside_pycache(site)
    cellgen_exe = python.parent / ("cellgen.exe" if os.name == "nt" else "cellgen")
    # 3. in the empty project: run, build, then the user's script
    (project / "myqrnn.py").write_text(MYQRNN)
    where = _run([str(python), "-c", "import cellgen; print(cellgen.__file__)"], project, env).stdout.strip()
    assert where == str(site / "cellgen" / "__init__.py"), f"not the wheel's cellgen: {where}"
    assert _run([str(python), "-c", no_generated], project, env).stdout.split() == ["None"]
    ran = _run([str(cellgen_exe), "run", "myqrnn.py", "--shape", "2,3,4,5"], project, env).stdout
    assert "loaded myqrnn from myqrnn.py" in ran and str(tmp_path / "cellgen-cache") in ran, ran
    assert not (project / "generated").exists(), "cellgen run wrote into the project"
    built = _run([str(cellgen_exe), "build", "myqrnn.py"], project, env).stdout
    assert built.startswith(f"wrote {project / 'generated' / 'myqrnn.py'}"), built
    assert sorted(p.name for p in (project / "generated").iterdir()) == ["__init__.py", "myqrnn.py"]
    refused = subprocess.run([str(cellgen_exe), "build", "myqrnn.py", "--out", str(site / "generated")], cwd=project,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "refusing to write generated modules into" in refused.stderr, refused.stderr
    (project / "use.py").write_text(USER_SCRIPT)
    got = json.loads(_run([str(python), "use.py"], project, env).stdout.splitlines()[-1])
    assert got["cellgen"] == str(site / "cellgen" / "__init__.py")
    assert got["generated"] == str(project / "generated" / "__init__.py")
    assert got["mine"] == str(project / "generated" / "myqrnn.py")
    assert got["lstm"] == ["cellgen.cells.lstm", str(site / "cellgen" / "cells" / "lstm.py")]
    assert got["again"][0].startswith("_cellgen_myqrnn_")
    assert Path(got["again"][1]).parent.parent == tmp_path / "cellgen-cache"
    assert got["same"] and got["load_is_memoized"] and got["lstm_shape"] == [2, 5, 2] and got["lstm_close"] < 1e-5
    assert got["top_level"] == ["generated", "generated.myqrnn"]
    # 4. Numba's cache=True cache: next to the module files, in the venv's site-packages too; a second
    #    process loads every kernel from it and compiles nothing
    assert list((site / "cellgen" / "cells" / "__pycache__").glob("lstm.*.nbi"))
    assert list((project / "generated" / "__pycache__").glob("myqrnn.*.nbi"))
    second = _run([str(python), "use.py"], project, dict(env, NUMBA_DEBUG_CACHE="1")).stdout
    assert "data saved" not in second and "index saved" not in second
    loaded = re.findall(r"data loaded from '(.*)'", second)
    for folder in (site / "cellgen" / "cells", project / "generated", Path(got["again"][1]).parent):
        assert any(Path(p).parent == folder / "__pycache__" for p in loaded), folder
    after = _files_outside_pycache(site)
    assert after == before, f"written into site-packages: {sorted(set(after) ^ set(before))}"
