"""The differential fuzzer: random legal specs, built by cellgen, against an evaluator of their equations.

Each example draws a spec file (``fuzz_specs.specs``), builds it with ``cellgen.build.build`` into a
fresh temporary folder, imports the generated module and compares ``backend="cpu"`` and
``backend="reference"`` in float64 and float32 with ``fuzz_specs.Evaluator`` (docs/testing.md).

* ``CELLGEN_FUZZ_EXAMPLES=2000`` runs more examples (default 100, as ``fuzz_shards.SHARDS`` tests of a fifth each);
* ``CELLGEN_FUZZ_EXCLUDE=old_read,name_collision`` leaves known bug classes out (``fuzz_specs.CLASSES``);
* ``CELLGEN_FUZZ_SEED=7`` draws another (still reproducible) sequence of specs;
* ``CELLGEN_FUZZ_SHRINK=1`` shrinks a failing spec (minutes: every try is a build and a JIT compile);
* ``CELLGEN_FUZZ_DTYPES=float64,float32`` checks every spec in both dtypes. By default each spec is
  checked in one, drawn with the spec: a JIT compile is most of an example's time, and each dtype
  still meets about half of the specs (about 50 of the CI's 100 each).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fuzz_specs import CLASSES, build_spec, check_spec, degenerate, specs
from fuzz_shards import fuzz_shards
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("CELLGEN_FUZZ_EXAMPLES", "100"))
DTYPES = tuple(np.dtype(d) for d in os.environ.get("CELLGEN_FUZZ_DTYPES", "").split(",") if d)


def _check_one(fz, data, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    spec = folder / "probe.py"
    spec.write_text(fz.text)
    assume(not degenerate(spec))
    dtypes = DTYPES or (data.draw(st.sampled_from([np.dtype(np.float64), np.dtype(np.float32)]), label="dtype"),)
    check_spec(fz, folder, dtypes=dtypes)


globals().update(fuzz_shards("test_random_specs_match_the_evaluator", EXAMPLES, _check_one))


@pytest.mark.long
def test_the_strategy_covers_every_class() -> None:
    """The default strategy draws every bug class; an excluded class is never drawn."""
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fz=specs())
    def collect(fz) -> None:
        seen.update(fz.classes)

    collect()
    assert seen == set(CLASSES)
    for cls in CLASSES:
        assert cls not in _classes_drawn(frozenset({cls}))


def _classes_drawn(exclude: frozenset[str]) -> set[str]:
    drawn: set[str] = set()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fz=specs(exclude=exclude))
    def without(fz) -> None:
        drawn.update(fz.classes)

    without()
    return drawn


def test_build_spec_imports_under_unique_names(tmp_path: Path) -> None:
    text = ("from cellgen.dsl import Cell, tanh\ncell = Cell('np')\nx = cell.input()\nh = cell.state('h')\n"
            "g = cell.linear([x, h], gates=('g',), kernel='k', bias='b')\ncell.update(h, tanh(g))\n"
            "cell.output(cell.updated(h))\n")
    _, first = build_spec(text, tmp_path / "a")
    _, second = build_spec(text, tmp_path / "b")
    assert first.__name__ != second.__name__ and first.NAME == second.NAME == "np"
