"""The differential fuzzer for training: random legal specs, their gradients against finite
differences of the fuzzer's own evaluator (tests/fuzz_specs.py, written from the DSL's trees, not
from the generator), in float64.

For each drawn spec, every parameter, the inputs and each initial state get a directional check:
``<grad, V>`` against ``(L(A + eps V) - L(A - eps V)) / (2 eps)`` for a random direction ``V``,
relative to ``|grad| |V|``, at most 1e-6; and the fused cpu backward must equal the unfused
reference one. ``CELLGEN_TRAIN_FUZZ_EXAMPLES`` (default 50, as ``fuzz_shards.SHARDS`` tests of a fifth each),
``CELLGEN_FUZZ_EXCLUDE`` and ``CELLGEN_FUZZ_SEED`` work as in tests/test_fuzz.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from fuzz_specs import Evaluator, build_spec, degenerate, from_text, load_cell, random_inputs
from fuzz_shards import fuzz_shards
from gradcheck import directional_error, linear_loss, relative_error
from hypothesis import assume

EXAMPLES = int(os.environ.get("CELLGEN_TRAIN_FUZZ_EXAMPLES", "50"))
TOL = 1e-6


def _check_one(fz, _data, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = spec_folder(fz, tmp_path_factory)
    assume(not degenerate(folder / "probe.py"))
    gradients_equal_finite_differences(fz, folder)


globals().update(fuzz_shards("test_random_spec_gradients_equal_finite_differences", EXAMPLES, _check_one))


def spec_folder(fz, tmp_path_factory: pytest.TempPathFactory):
    """A new folder holding the drawn spec's text as ``probe.py``."""
    folder = tmp_path_factory.mktemp("train_fuzz")
    (folder / "probe.py").write_text(fz.text)
    return folder


def gradients_equal_finite_differences(fz, folder) -> None:
    """One drawn spec: cpu gradients against directional finite differences, cpu against reference."""
    path, module = build_spec(fz.text, folder)
    ev = Evaluator(load_cell(path), fz.input_size, fz.num_units, fz.sizes)
    params, inputs, lengths, initial = random_inputs(ev, fz, np.dtype(np.float64))
    out, states = ev.dynamic_rnn(params, inputs, lengths, initial, fz.hyper)
    rng = np.random.default_rng(fz.seed + 1)
    r_out = rng.standard_normal(np.shape(out))
    r_states = [rng.standard_normal(np.shape(s)) for s in states]

    def loss() -> float:
        return linear_loss(*ev.dynamic_rnn(params, inputs, lengths, initial, fz.hyper), r_out, r_states)

    grads = {}
    for backend in ("cpu", "reference"):
        (got_out, _), backward = module.dynamic_rnn_vjp(params, inputs, sequence_length=lengths,
                                                        initial_state=module.State(*initial), backend=backend,
                                                        **fz.hyper)
        np.testing.assert_allclose(got_out, out, rtol=1e-10, atol=1e-10)
        g = backward(r_out, module.State(*r_states))
        grads[backend] = {**{f"params[{k}]": v for k, v in g.params.items()}, "inputs": g.inputs,
                          **{f"initial_state.{n}": s for n, s in zip(module.STATE, g.initial_state, strict=True)}}
    values = {**{f"params[{k}]": v for k, v in params.items()}, "inputs": inputs,
              **{f"initial_state.{n}": s for n, s in zip(module.STATE, initial, strict=True)}}
    errors = {name: directional_error(loss, values[name], grads["cpu"][name], rng) for name in values}
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL}
    assert not bad, f"directional finite differences disagree (relative error above {TOL}): {bad}"
    for name, want in grads["reference"].items():
        assert relative_error(grads["cpu"][name], want) <= 1e-10, f"cpu and reference differ in {name}"


#: counterexamples the training fuzzer found, shrunk by hand (each comment: what it saw)
CASES: dict[str, str] = {
    # a delay state only the output reads and a linear over [state, x] whose d_gates doubled as the hoisted
    # GEMM's dpre: "cannot reshape array of size 80 into shape (5,5,4)" (dpre had T rows, [x_{-1}, xs] T + 1)
    "delay_state_beside_an_aliased_dpre": """
cell = Cell("c"); x = cell.input(size=NUM_UNITS); h = cell.state("h"); q = cell.state("q")
g = cell.linear([h, x], gates=("g",), kernel="k", bias=None)
cell.update(q, x)
cell.update(h, tanh(g))
cell.output(q + 0.5 * tanh(g))
""",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_counterexample(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    text = "from cellgen.dsl import NUM_UNITS, Cell, tanh\n\n" + CASES[name].lstrip()
    fz = from_text(text, input_size=4, num_units=4)
    folder = spec_folder(fz, tmp_path_factory)
    assert not degenerate(folder / "probe.py"), "the counterexample no longer exercises the backward"
    gradients_equal_finite_differences(fz, folder)
