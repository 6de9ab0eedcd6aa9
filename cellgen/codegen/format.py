"""Stage 4c (module text -> module text): the generated modules formatted by a pinned ruff.

Templates give structure and the printers print expressions on one line each; the formatter
breaks the long ones and normalises quotes and spacing, so a generated module reads like
hand-written code (and passes ``ruff check``: tests/test_lint.py). ``ruff format`` runs
isolated (no configuration file of the project it runs in counts), without a cache, at
:data:`LINE_LENGTH`; its version (pinned in pyproject.toml) is part of every module's key
(:func:`cellgen.build.spec_key`), since another version may format differently.

The formatter changes layout only (line breaks, redundant parentheses around a whole
right-hand side, quotes, blank lines, docstring indentation): the code the module compiles to,
and so every number it computes, is the one the templates wrote.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: The ruff the build runs (pyproject.toml pins it as a dependency of cellgen).
RUFF_PIN = "ruff==0.17.6"
#: The longest line of a generated module (the repository's own limit, pyproject.toml).
LINE_LENGTH = 120
#: Ruff's command line: isolated from any project configuration, no cache written anywhere.
ARGS = ("format", "--isolated", "--no-cache", f"--line-length={LINE_LENGTH}", "--target-version=py310")


class FormatterError(RuntimeError):
    """The formatter is missing or failed (not a problem of a spec)."""


@functools.cache
def ruff_command() -> tuple[str, ...]:
    """The ruff executable: the ``ruff`` package's binary, else ``ruff`` on PATH."""
    try:
        from ruff.__main__ import find_ruff_bin

        return (os.fsdecode(find_ruff_bin()),)
    except (ImportError, FileNotFoundError):
        found = shutil.which("ruff")
        if found is None:
            raise FormatterError(f"cellgen build formats the generated modules with ruff, which is not installed: "
                                 f"pip install '{RUFF_PIN}' (a dependency of cellgen)") from None
        return (found,)


@functools.cache
def formatter_version() -> str:
    """``ruff 0.17.6``: what formats the modules (part of their key)."""
    return _run([*ruff_command(), "--version"]).stdout.strip()


def format_module(text: str) -> str:
    """One module's text, formatted (unchanged if it does not parse: ``verify`` then says why)."""
    return format_modules([text])[0]


def format_modules(texts: list[str]) -> list[str]:
    """Every text formatted, by one ruff process; a text that does not parse comes back unchanged
    (the build's ``verify`` step reports its syntax error as a SpecError naming the spec)."""
    if not texts:
        return []
    with tempfile.TemporaryDirectory(prefix="cellgen-format-") as folder:
        paths = [Path(folder, f"module_{k}.py") for k in range(len(texts))]
        for path, text in zip(paths, texts, strict=True):
            path.write_text(text, encoding="utf-8")
        done = _run([*ruff_command(), *ARGS, *map(str, paths)], check=False, cwd=folder)
        if done.returncode not in (0, 2) or (done.returncode == 2 and "Failed to parse" not in done.stderr):
            raise FormatterError(f"{' '.join(ruff_command())} {' '.join(ARGS)} failed "
                                 f"(exit {done.returncode}): {done.stderr.strip()}")
        return [path.read_text(encoding="utf-8") for path in paths]


def _run(command: list[str], check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)
    except OSError as err:
        raise FormatterError(f"cannot run the formatter {command[0]}: {err}") from None
    if check and done.returncode != 0:
        raise FormatterError(f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done
