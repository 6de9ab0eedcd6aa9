"""A build writes only verified modules, only inside its output folder, all of them or none (issue 9, 2 and 5).

Every build goes to tmp_path. Specs are the issue's three lines plus one line each.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from cellgen import cli
from cellgen.codegen import verify
from cellgen import build as build_module
from cellgen.build import build, stale, write_all
from cellgen.frontend.dsl import INITIALISERS, RESERVED
from cellgen.runtime import params as runtime_params
from cellgen.frontend.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent
HEAD = "import math\nfrom cellgen.dsl import Cell, tanh\n"
STEP = """
cell = Cell({name!r}{doc}); x = cell.input(); h = cell.state("h")
g = cell.linear([x, h], gates=("g",), kernel="k", bias="b")
cell.update(h, tanh(g)); cell.output(cell.updated(h))
"""


def write_spec(path: Path, name: str = "c", doc: str = "", extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD + STEP.format(name=name, doc=f", doc={doc!r}" if doc else "") + textwrap.dedent(extra))
    return path


def load(target: Path) -> ModuleType:
    """Import a generated file under a name of its own (never the repository's generated/)."""
    spec = importlib.util.spec_from_file_location(f"cellgen_safety_{abs(hash(target))}", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def error_line(args: list[str], capsys) -> str:
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# -- where outputs land ---------------------------------------------------------------

def test_an_output_on_its_own_spec_is_refused(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "mine.py", name="mine")
    before = spec.read_bytes()
    line = error_line(["build", str(spec), "--out", str(tmp_path)], capsys)
    assert f"{spec}:0: Cell: the output " in line and "is a spec file of this build" in line
    assert spec.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.py"]


def test_an_output_through_a_symlink_out_of_the_folder_is_refused(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "s.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.py").symlink_to(elsewhere / "c.py")
    line = error_line(["build", str(spec), "--out", str(out)], capsys)
    assert "Cell: c.py would be written to" in line and "outside" in line
    assert list(elsewhere.iterdir()) == []


def test_two_specs_with_one_cell_name_name_both_files(tmp_path: Path, capsys) -> None:
    a = write_spec(tmp_path / "specs" / "a.py", name="same")
    b = write_spec(tmp_path / "specs" / "b.py", name="Same")  # one file on a case-insensitive disk
    out = tmp_path / "out"
    line = error_line(["build", str(a.parent), "--out", str(out)], capsys)
    assert line.startswith(f"cellgen: error: {b}:4: Cell: cell name 'Same' is also the name of 'same' in {a}")
    assert not out.exists()


def test_one_spec_given_twice_builds_once(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "specs" / "a.py")
    (result,) = build([spec.parent, spec], out_dir=tmp_path / "out")
    assert result.target.name == "c.py"


# -- modules that built, then broke at import: now correct ------------------------------

@pytest.mark.parametrize("doc", ['quotes """ inside', "a backslash \\x and \\N{", "ends with a quote\"",
                                 "nul \x00 and bell \x07, \u2028 done", "unicode: \u210c \u00e9 \U0001f600"])
def test_any_doc_gives_an_importable_module_with_that_summary(doc: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.py", doc=doc)
    (result,) = build([spec], out_dir=tmp_path / "out")
    module = load(result.target)
    assert module.__doc__.splitlines()[0] == f"c: {doc.splitlines()[0]}".rstrip()  # as the formatter leaves it


def test_a_nan_hyper_default_is_printed_and_reaches_the_cell(tmp_path: Path) -> None:
    spec = tmp_path / "s.py"
    spec.write_text(HEAD + textwrap.dedent("""
        cell = Cell("c"); x = cell.input(); h = cell.state("h")
        a = cell.hyper("a", math.nan); lo = cell.hyper("lo", -math.inf)
        g = cell.linear([x, h], gates=("g",), kernel="k", bias="b")
        cell.update(h, tanh(g) * a); cell.output(cell.updated(h) + lo)
        """))
    (result,) = build([spec], out_dir=tmp_path / "out")
    module = load(result.target)
    assert math.isnan(module.HYPER["a"]) and module.HYPER["lo"] == -math.inf
    out, _ = module.dynamic_rnn(module.init_params(3, 4, seed=0), np.ones((2, 3, 3), np.float32),
                                backend="reference")
    assert np.isnan(out).all()


def test_every_named_initialiser_is_one_init_params_runs() -> None:
    for init in INITIALISERS:
        params = runtime_params.init_params({"w": (4,)}, {"w": init}, np.float32, seed=0)
        assert params["w"].shape == (4,) and np.isfinite(params["w"]).all()


def test_reserved_names_cover_the_generated_signatures(tmp_path: Path) -> None:
    (result,) = build([REPO / "specs" / "lstm.py"], out_dir=tmp_path / "out")
    module = load(result.target)

    def named(*fns) -> set[str]:
        return {p.name for fn in fns for p in inspect.signature(fn).parameters.values()
                if p.kind is not inspect.Parameter.VAR_KEYWORD}

    assert named(module.dynamic_rnn, module.bidirectional_dynamic_rnn, module.cell) <= set(RESERVED["hyper"])
    assert named(module.init_params, module.zero_state, module.param_shapes, module.state_size,
                 module.output_size) <= set(RESERVED["size"])


# -- legal specs that were rejected ----------------------------------------------------

LEGAL = {
    "one_gate_named_after_its_kernel": """
        cell = Cell("c"); x = cell.input(); h = cell.state("h")
        g = cell.linear([x, h], kernel="kernel")
        cell.update(h, tanh(g)); cell.output(cell.updated(h))
        """,
    "a_linear_over_an_updated_state": """
        cell = Cell("c"); x = cell.input(); h = cell.state("h"); q = cell.state("q")
        g = cell.linear([x, h], gates=("g",), kernel="k", bias="b")
        cell.update(h, tanh(g))
        g2 = cell.linear([cell.updated(h), q], gates=("g2",), kernel="k2", bias="b2")
        cell.update(q, tanh(g2)); cell.output(cell.updated(q) * cell.updated(h))
        """,
}


@pytest.mark.parametrize("case", sorted(LEGAL))
def test_legal_specs_build_and_match_the_reference(case: str, tmp_path: Path) -> None:
    spec = tmp_path / "s.py"
    spec.write_text(HEAD + textwrap.dedent(LEGAL[case]))
    (result,) = build([spec], out_dir=tmp_path / "out")
    module = load(result.target)
    params = module.init_params(3, 4, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 3, 3)).astype(np.float32)
    cpu, _ = module.dynamic_rnn(params, x, sequence_length=[3, 2])
    ref, _ = module.dynamic_rnn(params, x, sequence_length=[3, 2], backend="reference")
    np.testing.assert_allclose(cpu, ref, rtol=1e-5, atol=1e-6)


def test_an_alias_of_the_cell_is_one_cell(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.py", extra="alias = cell\n")
    assert load_spec(spec).name == "c"


def test_a_gate_may_share_its_kernels_name_but_a_param_may_not(tmp_path: Path) -> None:
    spec = tmp_path / "s.py"
    spec.write_text(HEAD + textwrap.dedent(LEGAL["one_gate_named_after_its_kernel"]))
    assert [str(g) for g in load_spec(spec).linears[0].gates] == ["kernel"]


# -- verify before writing -------------------------------------------------------------

@pytest.fixture
def fresh_verify(monkeypatch) -> list[list[str]]:
    """Forget what this process verified; record the module names of every import request."""
    monkeypatch.setattr(verify, "_VERIFIED", set())
    calls: list[list[str]] = []
    real = verify._WORKER.import_all

    def import_all(folder, package, names):
        calls.append(list(names))
        return real(folder, package, names)

    monkeypatch.setattr(verify._WORKER, "import_all", import_all)
    return calls


def _broken_render(tail: str):
    real = build_module.render_module

    def render(plan, spec_path, key):
        return real(plan, spec_path, key) + tail

    return render


def test_a_module_that_does_not_import_is_never_written(tmp_path: Path, monkeypatch, fresh_verify, capsys) -> None:
    good = write_spec(tmp_path / "specs" / "a.py", name="a")
    bad = write_spec(tmp_path / "specs" / "b.py", name="b")
    out = tmp_path / "out"
    build([good], out_dir=out)
    before = snapshot(out)
    monkeypatch.setattr(build_module, "render_module",
                        _broken_render('\nif NAME == "b":\n    raise RuntimeError("boom")\n'))
    line = error_line(["build", str(good.parent), "--out", str(out)], capsys)
    assert line.startswith(f"cellgen: error: {bad}:0: generated module: b.py cannot be imported: RuntimeError: boom")
    assert snapshot(out) == before  # a.py (changed text) was not written either


def test_a_module_that_does_not_compile_is_never_written(tmp_path: Path, monkeypatch, fresh_verify, capsys) -> None:
    spec = write_spec(tmp_path / "s.py")
    monkeypatch.setattr(build_module, "render_module", _broken_render("\ndef (:\n"))
    line = error_line(["build", str(spec), "--out", str(tmp_path / "out")], capsys)
    assert f"{spec}:0: generated module: c.py does not compile: SyntaxError" in line
    assert fresh_verify == [] and not (tmp_path / "out").exists()


def test_one_import_request_per_build_isolated_from_generated(tmp_path: Path, monkeypatch, fresh_verify) -> None:
    specs = [write_spec(tmp_path / "specs" / f"{n}.py", name=n) for n in ("a", "b")]
    probe = ('\nimport sys, os\nif ("generated" in sys.modules or not __name__.startswith("_cellgen_verify")\n'
             '        or os.getpid() == ' + str(os.getpid()) + '):\n'
             '    raise RuntimeError("not imported in isolation")\n')
    monkeypatch.setattr(build_module, "render_module", _broken_render(probe))
    results = build([tmp_path / "specs"], out_dir=tmp_path / "out")
    assert [r.changed for r in results] == [True, True]
    assert len(fresh_verify) == 1
    build([tmp_path / "specs"], out_dir=tmp_path / "out")  # unchanged: nothing to import again
    build(specs, out_dir=tmp_path / "other")  # the same texts, verified already in this process
    assert len(fresh_verify) == 1


def test_a_module_that_kills_or_hangs_the_import_worker_is_never_written(tmp_path: Path, monkeypatch,
                                                                         fresh_verify, capsys) -> None:
    spec = write_spec(tmp_path / "s.py")
    out = tmp_path / "out"
    cases = [("\nimport os\nos._exit(3)\n", "c.py could not be checked: the import check failed"),
             ("\nimport time\ntime.sleep(60)\n", "c.py could not be checked: did not import within 3 s")]
    monkeypatch.setattr(verify, "IMPORT_TIMEOUT", 3.0)
    renders = {tail: _broken_render(tail) for tail in ("\nimport os\nos._exit(3)\n", "\nimport time\ntime.sleep(60)\n",
                                                      '\nprint("{}")\n')}
    for tail, message in cases:
        monkeypatch.setattr(build_module, "render_module", renders[tail])
        line = error_line(["build", str(spec), "--out", str(out)], capsys)
        assert f"{spec}:0: generated module: {message}" in line
        assert not out.exists()
    # the next build gets a new worker; what a module prints at import does not confuse it
    monkeypatch.setattr(build_module, "render_module", renders['\nprint("{}")\n'])
    (result,) = build([spec], out_dir=out)
    assert result.changed and (out / "c.py").is_file() and len(fresh_verify) == 3


# -- all or nothing --------------------------------------------------------------------

def _two_files(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("a = 1\n")
    past = 1_600_000_000 * 1_000_000_000
    os.utime(a, ns=(past, past))
    return [a, b]


def test_an_error_between_files_restores_the_ones_replaced(tmp_path: Path, monkeypatch) -> None:
    a, b = _two_files(tmp_path)
    before = snapshot(tmp_path)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if Path(dst) == b:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(build_module.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        write_all([(a, "a = 2\n"), (b, "b = 2\n")])
    monkeypatch.setattr(build_module.os, "replace", real)
    assert calls[:2] == [a, b]
    assert snapshot(tmp_path) == before  # a's bytes and mtime back, b never created, no temporary files


def test_ctrl_c_between_files_is_delivered_after_the_last(tmp_path: Path, monkeypatch) -> None:
    a, b = _two_files(tmp_path)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst) == a:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(build_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_all([(a, "a = 2\n"), (b, "b = 2\n")])
    assert a.read_text() == "a = 2\n" and b.read_text() == "b = 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "b.py"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_multi_spec_build_that_fails_mid_way_leaves_the_old_files(tmp_path: Path, monkeypatch) -> None:
    specs = [write_spec(tmp_path / "specs" / f"{n}.py", name=n) for n in ("a", "b")]
    out = tmp_path / "out"
    build(specs, out_dir=out)
    for spec in specs:
        spec.write_text(spec.read_text().replace("tanh(g)", "tanh(2 * g)"))
    before = snapshot(out)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "b.py":
            raise OSError("no space left")
        real(src, dst)

    monkeypatch.setattr(build_module.os, "replace", replace)
    with pytest.raises(OSError):
        build(specs, out_dir=out)
    assert snapshot(out) == before


# -- --check: a generated file whose spec is gone ---------------------------------------

def test_check_reports_a_generated_file_whose_spec_is_gone(tmp_path: Path, capsys) -> None:
    specs = [write_spec(tmp_path / "specs" / f"{n}.py", name=n) for n in ("a", "b")]
    out = tmp_path / "out"
    build(specs, out_dir=out)
    (out / "notes.py").write_text("# not generated\n")
    assert stale([tmp_path / "specs"], out) == []
    specs[1].unlink()
    args = ["build", "--check", str(tmp_path / "specs"), "--out", str(out)]
    assert cli.main(args) == 1
    assert f"stale: {out / 'b.py'} (its spec {specs[1]} is gone" in capsys.readouterr().err
    specs[1].write_text(specs[0].read_text().replace("'a'", "'b'"))
    specs[0].write_text(specs[0].read_text().replace("'a'", "'a2'"))  # renamed: a.py is left behind
    report = build_module.stale_report([tmp_path / "specs"], out)
    assert (out / "a.py", f"its spec {specs[0]} now builds a2.py: delete it") in report
    assert (out / "a2.py", "missing") in report


# -- section 5: a spec runs with a time limit -------------------------------------------

def test_a_spec_that_never_returns_is_stopped(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "loop.py"
    spec.write_text("while True:\n    pass\n")
    handler = signal.getsignal(signal.SIGALRM)
    line = error_line(["check", str(spec), "--timeout", "0.3"], capsys)
    assert re.match(rf"cellgen: error: {re.escape(str(spec))}:[12]: spec: did not finish within 0.3 s", line), line
    assert signal.getsignal(signal.SIGALRM) is handler  # put back, and no timer left running
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_timeout_and_a_bad_timeout(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path / "s.py")
    assert load_spec(spec, timeout=0).name == "c"
    with pytest.raises(SystemExit):
        cli.main(["check", str(spec), "--timeout", "-1"])
    assert "--timeout" in capsys.readouterr().err


def test_sys_exit_in_a_spec_fails_the_build_through_the_command(tmp_path: Path) -> None:
    spec = tmp_path / "s.py"
    spec.write_text("import sys\nsys.exit(0)\n")
    proc = subprocess.run([sys.executable, "-m", "cellgen.cli", "build", str(spec), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"cellgen: error: {spec}:2: spec: spec called sys.exit(0); a spec file must run " \
                                  "to its end"
    assert not (tmp_path / "out").exists()


def test_spec_error_is_one_line() -> None:
    assert str(SpecError("s.py", 3, "spec", "a\nb  c")) == "s.py:3: spec: a b c"
