"""Broken specs: `cellgen build` exits non-zero with ONE line naming the spec file, the line and the gate.

Every case is built over an existing good build of a cell with the same name: the generated file
must stay byte-identical with the same mtime, and nothing else may be written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cellgen import cli
from cellgen.build import build, compile_spec
from cellgen.frontend.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent
HEADER = "import sympy\nfrom cellgen.dsl import INPUT_SIZE, Cell, sigmoid, tanh\n\n"

GOOD = """
cell = Cell("broken")
x = cell.input()
h = cell.state("h")
g = cell.linear([x, h], gates=("g",), kernel="kernel")
cell.update(h, tanh(g))
cell.output(h)
"""

# name -> (spec body; the line marked `# <-` is the one the error must name, the gate, a message fragment)
CASES: dict[str, tuple[str, str, str]] = {
    "update_of_a_non_state": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.update(g, h)  # <-
        cell.output(h)
        """, "update of g", "g is not a state"),
    "state_never_updated": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        c = cell.state("c")  # <-
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(h)
        """, "state c", "never updated"),
    "size_mismatch_in_a_linear_operand": ("""
        cell = Cell("broken")
        p = cell.size("num_proj")
        x = cell.input()
        h = cell.state("h")
        m = cell.state("m", size=p)
        g = cell.linear([x, h + m], gates=("g",), kernel="kernel")  # <-
        cell.update(h, tanh(g))
        cell.update(m, m)
        cell.output(h)
        """, "linear 'kernel'", "size mismatch in Add: operands have sizes num_proj and num_units"),
    "size_mismatch_elementwise": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) * x)  # <-
        cell.output(h)
        """, "update of h", "size mismatch in Mul: operands have sizes input_size and num_units"),
    "size_mismatch_in_an_update": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel", size=INPUT_SIZE)
        cell.update(h, tanh(g))  # <-
        cell.output(h)
        """, "update of h", "state has size num_units, the update has size input_size"),
    "unknown_function_sin": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, sympy.sin(g))  # <-
        cell.output(h)
        """, "update of h", "unknown function 'sin'"),
    "unknown_custom_function": ("""
        cell = Cell("broken")
        swish = sympy.Function("swish")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.output(swish(h))  # <-
        cell.update(h, tanh(g))
        """, "output", "unknown function 'swish'"),
    "non_elementwise_sum": ("""
        cell = Cell("broken")
        k = sympy.Symbol("k", integer=True)
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) + sympy.Sum(g, (k, 0, 3)))  # <-
        cell.output(h)
        """, "update of h", "non-elementwise operation 'Sum'"),
    "non_elementwise_matrix": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, sympy.Matrix([[h, h]])], gates=("g",), kernel="kernel")  # <-
        cell.update(h, tanh(g))
        cell.output(h)
        """, "linear 'kernel'", "non-elementwise operation"),
    "undefined_name": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        y = sympy.Symbol("y")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) + y)  # <-
        cell.output(h)
        """, "update of h", "undefined name 'y'"),
    "cycle_between_updated_states": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        c = cell.state("c")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) + cell.updated(c))  # <-
        cell.update(c, cell.updated(h) * c)
        cell.output(h)
        """, "update of h", "cycle between updated states: h -> c -> h"),
    "state_updated_from_itself": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) + cell.updated(h))  # <-
        cell.output(h)
        """, "update of h", "cycle between updated states: h -> h"),
    "name_error": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tahn(g))  # <-
        cell.output(h)
        """, "spec", "NameError: name 'tahn' is not defined"),
    "syntax_error": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates=("g",), kernel="kernel"  # <-
        cell.output(g)
        """, "spec", "SyntaxError"),
    "duplicate_state": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        h2 = cell.state("h")  # <-
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(h)
        """, "h", "name 'h' is declared twice"),
    "gate_named_like_a_state": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("h",), kernel="kernel")  # <-
        cell.update(h, tanh(g))
        cell.output(h)
        """, "h", "name 'h' is declared twice"),
    "duplicate_kernel": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel", bias=None)
        q = cell.linear([x, h], gates=("q",), kernel="kernel", bias=None)  # <-
        cell.update(h, tanh(g) * q)
        cell.output(h)
        """, "linear 'kernel'", "parameter name 'kernel' is already used"),
    "no_output": ("""
        cell = Cell("broken")  # <-
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        """, "output", "exactly one output, found 0"),
    "two_outputs": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(h)
        cell.output(g)  # <-
        """, "output", "exactly one output, found 2"),
    "two_inputs": ("""
        cell = Cell("broken")
        x = cell.input()
        y = cell.input("y")  # <-
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(h)
        """, "input", "exactly one input, found 2"),
    "no_state": ("""
        cell = Cell("broken")  # <-
        x = cell.input()
        g = cell.linear([x], gates=("g",), kernel="kernel")
        cell.output(tanh(g))
        """, "state", "at least one state"),
    "two_cells": ("""
        cell = Cell("broken")
        other = Cell("other")  # <-
        """, "spec", "exactly one cellgen.dsl.Cell, found 2"),
    "bad_gate_name": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("a b",), kernel="kernel")  # <-
        cell.update(h, tanh(g))
        cell.output(h)
        """, "linear 'kernel'", "gate name 'a b' must be a Python identifier"),
    "undeclared_size": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h", size=5)  # <-
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(h)
        """, "h", "size 5 is not a declared size"),
    "scalar_output": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        fb = cell.hyper("fb", 1.0)
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(2 * fb)  # <-
        """, "output", "must be a vector, not a scalar"),
    "symbolic_exponent": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) ** h)  # <-
        cell.output(h)
        """, "update of h", "needs a constant exponent"),
    "two_delay_states": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        a = cell.state("a", size=INPUT_SIZE)
        b = cell.state("b", size=INPUT_SIZE)
        g = cell.linear([x, a, b, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.update(a, x)
        cell.update(b, x)  # <-
        cell.output(h)
        """, "update of b", "keep one delay state"),

    # -- names (issue 9, section 2): a cell name is a module name, a state a namedtuple field
    "cell_name_is_a_path": ("""
        cell = Cell("../specs/mine")  # <-
        """, "Cell", "cell name '../specs/mine' must be a Python identifier"),
    "cell_name_init": ("""
        cell = Cell("__init__")  # <-
        """, "Cell", "cell name '__init__' cannot name a module"),
    "cell_name_keyword": ("""
        cell = Cell("class")  # <-
        """, "Cell", "cell name 'class' cannot name a module"),
    "state_named_like_a_keyword": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("class")  # <-
        """, "state class", "cannot be a field of the State namedtuple"),
    "state_with_a_leading_underscore": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("_h")  # <-
        """, "state _h", "cannot be a field of the State namedtuple"),
    "names_equal_after_nfkc": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("H")
        h2 = cell.state("\u210c")  # <-
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.update(h2, h)
        cell.output(h)
        """, "H", "name 'H' is declared twice (first as a state on line 6)"),
    "state_named_like_a_size": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("num_units")  # <-
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g))
        cell.output(h)
        """, "num_units", "name 'num_units' is the name of a size"),
    "hyper_declared_twice": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        a = cell.hyper("a", 1.0)
        a2 = cell.hyper("a", 2.0)  # <-
        g = cell.linear([x, h], gates=("g",), kernel="kernel")
        cell.update(h, tanh(g) * a)
        cell.output(h)
        """, "a", "name 'a' is declared twice (first as a hyper on line 7)"),
    "size_declared_twice": ("""
        cell = Cell("broken")
        p = cell.size("num_proj")
        p2 = cell.size("num_proj")  # <-
        """, "num_proj", "name 'num_proj' is declared twice"),
    "size_named_like_a_hyper": ("""
        cell = Cell("broken")
        a = cell.hyper("a", 1.0)
        p = cell.size("a")  # <-
        """, "a", "name 'a' is declared twice (first as a hyper"),
    "hyper_named_like_a_dynamic_rnn_keyword": ("""
        cell = Cell("broken")
        a = cell.hyper("sequence_length", 1.0)  # <-
        """, "hyper sequence_length", "is a keyword argument of the generated functions"),
    "hyper_named_like_a_bidirectional_keyword": ("""
        cell = Cell("broken")
        a = cell.hyper("initial_state_bw", 1.0)  # <-
        """, "hyper initial_state_bw", "is a keyword argument of the generated functions"),
    "size_named_like_an_init_params_keyword": ("""
        cell = Cell("broken")
        p = cell.size("seed")  # <-
        """, "size seed", "is a keyword argument of the generated functions"),
    "size_named_like_zero_state_keyword": ("""
        cell = Cell("broken")
        p = cell.size("batch_size")  # <-
        """, "size batch_size", "is a keyword argument of the generated functions"),
    # -- argument types and values, checked where the DSL call is made
    "init_normal": ("""
        cell = Cell("broken")
        w = cell.param("w", init="normal")  # <-
        """, "param w", "init 'normal' is not an initialiser; use a finite number or one of 'uniform'"),
    "init_inf": ("""
        import math
        cell = Cell("broken")
        w = cell.param("w", init=math.inf)  # <-
        """, "param w", "init must be finite, got inf"),
    "bias_init_nan": ("""
        import math
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates=("g",), kernel="kernel", bias_init=math.nan)  # <-
        """, "linear 'kernel'", "bias_init must be finite, got nan"),
    "hyper_default_a_str": ("""
        cell = Cell("broken")
        a = cell.hyper("a", "1.0")  # <-
        """, "hyper a", "default must be a real number, got str '1.0'"),
    "kernel_a_symbol": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates=("g",), kernel=sympy.Symbol("k"))  # <-
        """, "linear k", "kernel= must be a non-empty str (the parameter's name), got Symbol k"),
    "bias_not_a_str": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates=("g",), kernel="kernel", bias=0.0)  # <-
        """, "linear 'kernel'", "bias= must be a non-empty str"),
    "gates_a_str": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates="pre", kernel="kernel")  # <-
        """, "linear 'kernel'", "gates='pre' is a str; for one gate named 'pre' write gates=('pre',)"),
    "gates_zero": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates=0, kernel="kernel")  # <-
        """, "linear 'kernel'", "gates=0 must be at least 1"),
    "gates_empty": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear([x], gates=(), kernel="kernel")  # <-
        """, "linear 'kernel'", "gates must be a count or a non-empty tuple of names"),
    "operands_not_a_list": ("""
        cell = Cell("broken")
        x = cell.input()
        g = cell.linear(x, gates=("g",), kernel="kernel")  # <-
        """, "linear 'kernel'", "operands must be a list of vector expressions"),
    "kernel_named_like_a_param": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        w = cell.param("w")
        g = cell.linear([x, h], gates=("g",), kernel="w")  # <-
        cell.update(h, tanh(g) * w)
        cell.output(h)
        """, "linear 'w'", "parameter name 'w' is already used by param w"),
    "linear_over_its_own_updated_gate": ("""
        cell = Cell("broken")
        x = cell.input()
        h = cell.state("h")
        g = cell.linear([x, cell.updated(h)], gates=("g",), kernel="kernel")  # <-
        cell.update(h, tanh(g))
        cell.output(h)
        """, "linear 'kernel' (gates g)", "cycle between linears: kernel -> kernel"),
    # -- section 5: whatever a spec raises is a SpecError
    "sys_exit_0": ("""
        import sys
        cell = Cell("broken")
        sys.exit(0)  # <-
        """, "spec", "spec called sys.exit(0)"),
    "raise_system_exit_with_a_message": ("""
        raise SystemExit("bye")  # <-
        """, "spec", "spec called sys.exit('bye')"),
    "a_base_exception": ("""
        class Stop(BaseException):
            pass
        raise Stop("here")  # <-
        """, "spec", "Stop: here"),
}


def _spec_text(body: str) -> tuple[str, int]:
    """The spec file's text and the 1-based line marked ``# <-``."""
    text = HEADER + textwrap.dedent(body).lstrip("\n")
    line = next(k for k, ln in enumerate(text.splitlines(), 1) if ln.rstrip().endswith("# <-"))
    return text, line


@pytest.fixture(scope="module")
def good_build(tmp_path_factory) -> Path:
    """One good build of cell ``broken`` (built and verified once: a build imports its modules)."""
    folder = tmp_path_factory.mktemp("good")
    good = folder / "good.py"
    good.write_text(HEADER + textwrap.dedent(GOOD))
    (result,) = build([good], out_dir=folder / "out")
    assert result.changed and result.target == folder / "out" / "broken.py"
    return folder / "out"


@pytest.fixture
def built(tmp_path: Path, good_build: Path) -> tuple[Path, Path]:
    """A copy of the good build in tmp_path/out: (out dir, the generated file)."""
    out = tmp_path / "out"
    shutil.copytree(good_build, out)
    target = out / "broken.py"
    past = 1_000_000_000 * 1_600_000_000  # an old mtime: a rewrite could not keep it by chance
    os.utime(target, ns=(past, past))
    return out, target


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_reports_one_line_and_writes_nothing(case: str, tmp_path: Path, built, capsys) -> None:
    out, _ = built
    body, gate, fragment = CASES[case]
    text, line = _spec_text(body)
    spec = tmp_path / f"{case}.py"
    spec.write_text(text)
    before = _snapshot(out)

    code = cli.main(["build", str(spec), "--out", str(out)])

    captured = capsys.readouterr()
    assert code != 0
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cellgen: error: {spec}:{line}: {gate}: "), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in captured.err
    assert _snapshot(out) == before


@pytest.mark.parametrize("case", ["cycle_between_updated_states", "two_delay_states", "name_error"])
def test_spec_error_fields(case: str, tmp_path: Path) -> None:
    body, gate, fragment = CASES[case]
    text, line = _spec_text(body)
    spec = tmp_path / "s.py"
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        compile_spec(spec)
    err = info.value
    assert (Path(err.path), err.line, err.gate) == (spec, line, gate)
    assert fragment in err.message


def test_a_broken_spec_in_a_folder_stops_the_whole_build(tmp_path: Path, built) -> None:
    out, _ = built
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "a_good.py").write_text(HEADER + textwrap.dedent(GOOD).replace('"broken"', '"fine"'))
    (folder / "b_bad.py").write_text(_spec_text(CASES["two_outputs"][0])[0])
    before = _snapshot(out)
    assert cli.main(["build", str(folder), "--out", str(out)]) != 0
    assert _snapshot(out) == before  # not even the good spec's module


def test_missing_spec_file(tmp_path: Path, capsys) -> None:
    assert cli.main(["build", str(tmp_path / "nope.py"), "--out", str(tmp_path)]) != 0
    assert "nope.py:0: spec: no such spec file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_command_reports_the_same_error(tmp_path: Path, capsys) -> None:
    body, gate, _ = CASES["state_never_updated"]
    text, line = _spec_text(body)
    spec = tmp_path / "s.py"
    spec.write_text(text)
    assert cli.main(["check", str(spec)]) != 0
    assert f"{spec}:{line}: {gate}:" in capsys.readouterr().err


def test_through_a_subprocess(tmp_path: Path, built) -> None:
    out, _ = built
    body, gate, fragment = CASES["size_mismatch_elementwise"]
    text, line = _spec_text(body)
    spec = tmp_path / "bad.py"
    spec.write_text(text)
    before = _snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "cellgen.cli", "build", str(spec), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cellgen: error: {spec}:{line}: {gate}: "), proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(out) == before


def test_every_shipped_spec_loads() -> None:
    for path in sorted((REPO / "specs").glob("*.py")):
        spec = load_spec(path)
        assert spec.name == path.stem
