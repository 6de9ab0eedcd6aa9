"""Generated code reads like hand-written code: formatted by the pinned ruff, lint-clean, short lines,
temporaries in their own namespace (docs/testing.md, "Generated code").

Linted with the repository's own ruff configuration (pyproject.toml: E, W, F, B, UP, SIM, line length
120, which is also the formatter's :data:`cellgen.codegen.format.LINE_LENGTH`): the shipped
``generated/`` modules and fresh builds of fuzzer specs (names drawn to collide with the generator's).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_specs import degenerate, specs
from hypothesis import HealthCheck, given, settings

from cellgen import build as build_module
from cellgen.build import generate
from cellgen.codegen import format as fmt
from cellgen.codegen.names import FAMILIES
from cellgen.codegen.render import LONG_LINE

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
#: How many fuzzer specs are built and linted.
FUZZ_SPECS = 12
#: The one ruff finding generated code may have, and where: an unfused CUDA epilogue kernel
#: (``_cuda_epilogue<k>``, a fallback no shipped spec needs) whose only loop keeps its unit guard
#: ``if j < D:`` inside the row's ``if b < B and t < lengths[b]:`` (SIM102, nested ifs). Each loop of
#: such a kernel has its own domain guard; the two conditions stay apart so that every loop's guard
#: reads the same whatever the number of loops.
ALLOWED = (("SIM102", "_cuda_epilogue"), ("SIM102", "_cuda_train_epilogue"))  # the training forward's copy


def ruff_findings(*paths: Path) -> list[tuple[str, str, str]]:
    """(rule, enclosing top-level function or "", the finding's line) for every ruff finding."""
    done = subprocess.run([*fmt.ruff_command(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                           "--output-format", "concise", *map(str, paths)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr
    found = []
    for line in done.stdout.splitlines():
        match = re.match(r"(.+?):(\d+):\d+: (\w+) ", line)
        if match is None:
            continue
        tree = ast.parse(Path(match[1]).read_text(encoding="utf-8"))
        row = int(match[2])
        owner = next((n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                      and n.lineno <= row <= (n.end_lineno or n.lineno)), "")
        found.append((match[3], owner, line))
    return found


def assert_reads_like_hand_written(paths: list[Path], allowed=()) -> None:
    findings = [f for f in ruff_findings(*paths)
                if not any(f[0] == rule and f[1].startswith(fn) for rule, fn in allowed)]
    assert not findings, "\n".join(f[2] for f in findings)
    for path in paths:
        text = path.read_text(encoding="utf-8")
        long = [k for k, line in enumerate(text.splitlines(), 1)
                if len(line) > fmt.LINE_LENGTH and not line.endswith(LONG_LINE)]
        assert not long, f"{path}: lines {long} are longer than {fmt.LINE_LENGTH}"
        assert fmt.format_module(text) == text, f"{path} is not formatted"
        assert_temporaries_are_temporaries(path, text)


def assert_temporaries_are_temporaries(path: Path, text: str) -> None:
    """A name of a temporaries' family (cellgen.codegen.names.FAMILIES) is only ever a local variable
    assigned in a function body: no argument, no module-level name, no loop variable of the templates."""
    tree = ast.parse(text)
    for node in tree.body:  # module level: no definition in a family
        targets = [node.name] if isinstance(node, ast.FunctionDef | ast.ClassDef) else [
            n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        ] if isinstance(node, ast.Assign | ast.AnnAssign) else []
        assert not [t for t in targets if FAMILIES.fullmatch(t)], f"{path}: module-level {targets}"
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        args = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]
        assert not [a for a in args if FAMILIES.fullmatch(a)], f"{path}: {fn.name}({args})"
        for node in ast.walk(fn):
            if isinstance(node, ast.For):
                names = [n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)]
                assert not [n for n in names if FAMILIES.fullmatch(n)], f"{path}: {fn.name}: for {names}"


def test_the_shipped_modules_read_like_hand_written_code() -> None:
    assert_reads_like_hand_written(sorted((ROOT / "generated").glob("*.py")))


def random_modules(folder: Path) -> list[Path]:
    """FUZZ_SPECS fuzzer specs (derandomized draws, none degenerate), each generated into ``folder``."""
    specs_drawn: list[Path] = []

    @settings(max_examples=10 * FUZZ_SPECS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fz=specs())
    def collect(fz) -> None:
        if len(specs_drawn) < FUZZ_SPECS:
            spec = folder / f"spec_{len(specs_drawn)}.py"
            spec.write_text(fz.text)
            if not degenerate(spec):
                specs_drawn.append(spec)

    collect()
    assert len(specs_drawn) == FUZZ_SPECS
    modules = []
    for spec in specs_drawn:
        modules.append(spec.with_name(spec.name.replace("spec_", "module_")))
        modules[-1].write_text(generate(spec)[1], encoding="utf-8")
    return modules


def test_random_specs_build_lint_clean_modules(tmp_path: Path) -> None:
    assert_reads_like_hand_written(random_modules(tmp_path), allowed=ALLOWED)


def test_a_spec_at_a_long_path_builds_a_lint_clean_module(tmp_path: Path) -> None:
    """The header and SPEC_PATH hold the spec's path, however long: those lines say noqa, the rest fit,
    and the stale check still reads the path back from the header."""
    folder = tmp_path / ("a_folder_with_a_long_name_" * 4) / "specs"
    folder.mkdir(parents=True)
    spec = folder / "qrnn_f.py"
    spec.write_text((ROOT / "specs" / "qrnn_f.py").read_text())
    module = tmp_path / "qrnn_f.py"
    module.write_text(generate(spec)[1], encoding="utf-8")
    lines = module.read_text().splitlines()
    marked = [k for k, line in enumerate(lines) if line.endswith(LONG_LINE)]
    assert len(str(spec)) > fmt.LINE_LENGTH - 40 and len(marked) == 3, marked
    assert_reads_like_hand_written([module], allowed=ALLOWED)
    assert build_module._header_spec(module) == spec


def test_the_formatter_is_pinned() -> None:
    """pyproject.toml pins exactly the ruff the build uses, and it is the one installed."""
    dependencies = re.search(r"^dependencies = \[(.*?)\]", PYPROJECT, re.S | re.M)[1]
    assert f'"{fmt.RUFF_PIN}"' in dependencies
    assert fmt.formatter_version() == "ruff " + fmt.RUFF_PIN.split("==")[1]
    assert re.search(r"^\[tool\.ruff\]\nline-length = (\d+)", PYPROJECT, re.M)[1] == str(fmt.LINE_LENGTH)


def test_formatting_changes_only_layout() -> None:
    text = "def f(a,b):\n    x = (a if a > b or a != a else b)\n    return ('%s' % x, )\n"
    formatted = fmt.format_module(text)
    assert formatted == "def f(a, b):\n    x = a if a > b or a != a else b\n    return (\"%s\" % x,)\n"
    assert ast.dump(ast.parse(formatted)) == ast.dump(ast.parse(text))
    broken = "def f(:\n"
    assert fmt.format_modules([broken, text]) == [broken, formatted]  # verify reports the syntax error


def test_a_missing_formatter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ruff.__main__", None)  # import fails
    monkeypatch.setattr(fmt.shutil, "which", lambda name: None)
    fmt.ruff_command.cache_clear()
    try:
        with pytest.raises(fmt.FormatterError, match=r"pip install 'ruff==\d+\.\d+\.\d+'"):
            fmt.ruff_command()
    finally:
        fmt.ruff_command.cache_clear()
