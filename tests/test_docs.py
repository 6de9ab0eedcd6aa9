"""The docs cannot rot: the MGU spec in docs/dsl.md is built, run and checked against the oracle."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import references as ref

from cellgen.build import build, compile_spec

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def python_block_after(doc: Path, marker: str) -> str:
    """The first ```python block after ``marker`` in ``doc``."""
    text = doc.read_text()
    start = text.index(marker)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match, f"no ```python block after {marker!r} in {doc}"
    return match.group(1)


@pytest.fixture(scope="module")
def mgu(tmp_path_factory) -> ModuleType:
    folder = tmp_path_factory.mktemp("mgu")
    spec = folder / "mgu.py"
    spec.write_text(python_block_after(DOCS / "dsl.md", "<!-- mgu-spec"))
    (result,) = build([spec], out_dir=folder / "out")
    assert result.target.name == "mgu.py"
    module_spec = importlib.util.spec_from_file_location("cellgen_docs_mgu", result.target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_mgu_plan_is_as_documented(tmp_path: Path) -> None:
    spec = tmp_path / "mgu.py"
    spec.write_text(python_block_after(DOCS / "dsl.md", "<!-- mgu-spec"))
    _, plan = compile_spec(spec)
    assert plan.hoisted.direct_linears == ("forget/kernel", "candidate/kernel")
    assert [g.linears for g in plan.gemms] == [("forget/kernel",), ("candidate/kernel",)]
    assert [e.index for e in plan.epilogues] == [1, 2]
    assert plan.double_buffered == ()


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mgu_from_the_docs_matches_the_reference(mgu: ModuleType, backend: str, dtype, tol: float) -> None:
    rng = np.random.default_rng(7)
    params = ref.random_params("mgu", 5, 4, rng, dtype)
    assert mgu.param_shapes(5, 4) == {k: v.shape for k, v in params.items()}
    inputs = rng.standard_normal((5, 6, 5)).astype(dtype)
    lengths = np.array([6, 0, 3, 6, 1])
    state = (rng.standard_normal((5, 4)).astype(dtype),)
    want_out, want_state = ref.dynamic_rnn("mgu", params, inputs, lengths, state)
    out, final = mgu.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend=backend)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(final.h, want_state[0], rtol=tol, atol=tol)


def test_readme_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert {"docs/dsl.md", "docs/generated-api.md", "docs/architecture.md"} <= set(links)
    for link in links:
        assert (REPO / link).is_file(), link


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """README's second command (set up and run the tests) is the last line of .ci/run, word for word."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and ci[-1] == commands[1], (commands, ci)


def test_documented_error_messages_are_real() -> None:
    """Each example message in docs/dsl.md's table comes from spec.py's wording."""
    text = (DOCS / "dsl.md").read_text()
    source = "".join(p.read_text() for p in sorted((REPO / "cellgen").rglob("*.py")))
    for fragment in ("is not a state (declare it with cell.state)", "state is never updated (add cell.update)",
                     "cycle between updated states", "cycle between linears", "is declared twice",
                     "is already used", "non-elementwise operation", "unknown function"):
        assert fragment in text and fragment in source, fragment


def test_the_training_example_runs() -> None:
    """docs/training.md's API example, as written: its gradients have the parameters' names and shapes."""
    scope: dict = {}
    exec(python_block_after(DOCS / "training.md", "<!-- training-example"), scope)  # noqa: S102 - our own doc
    grads, params, x = scope["grads"], scope["params"], scope["x"]
    assert {k: v.shape for k, v in grads.params.items()} == {k: v.shape for k, v in params.items()}
    assert grads.inputs.shape == x.shape and not np.any(grads.inputs[7])  # the length-0 row gets nothing
