"""The IR's scheduling choices: a time loop that may not update states in place, directions, GEMM kinds.

A plan whose time loop keeps every old state (``TimeLoop(in_place=False)``, what a forward needs
when a backward replays its states) renders double-buffered kernels that compute exactly the
same numbers as the in-place ones; a reverse plan is refused by every backend by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from cellgen.build import compile_spec
from cellgen.codegen.render import render_module
from cellgen.ir.analysis import analyse
from cellgen.ir.passes import run_passes
from cellgen.ir.plan import Direction, GemmKind, TimeLoop

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_forward_plans_have_forward_kinds() -> None:
    _, plan = compile_spec(SPECS / "lstm.py")
    assert plan.time_loop == TimeLoop(Direction.FORWARD, in_place=True, saved=())
    assert plan.hoisted.kind is GemmKind.OPERAND_W
    assert {g.kind for g in plan.gemms} == {GemmKind.OPERAND_W}


def test_analysis_double_buffers_every_state_until_the_pass_decides() -> None:
    spec, plan = compile_spec(SPECS / "basic_lstm.py")
    assert analyse(spec).double_buffered == ("c", "h")
    assert plan.double_buffered == ()  # update_in_place: nothing reads c or h after their store


@pytest.mark.parametrize("name", ["basic_lstm", "lstm", "gru"])
def test_no_in_place_updates_compute_the_same_numbers(name: str, tmp_path: Path) -> None:
    spec, in_place = compile_spec(SPECS / f"{name}.py")
    kept = run_passes(dataclasses.replace(analyse(spec), time_loop=TimeLoop(in_place=False)))
    assert kept.double_buffered == kept.recurrent_states != in_place.double_buffered
    modules = []
    for label, plan in (("in_place", in_place), ("kept", kept)):
        target = tmp_path / f"{name}_{label}.py"
        target.write_text(render_module(plan, f"specs/{name}.py", label))
        modules.append(_import(target, f"_test_ir_{name}_{label}"))
    a, b = modules
    sizes = {s: 5 for s in a.SIZES}
    params = a.init_params(4, 6, dtype=np.float64, seed=3, **sizes)
    rng = np.random.default_rng(4)
    inputs = rng.standard_normal((3, 7, 4))
    state = a.State(*(rng.standard_normal((3, n)) for n in a.state_size(6, **sizes)))
    lengths = np.array([7, 0, 4])
    for backend in ("cpu", "reference"):
        out_a, st_a = a.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend=backend)
        out_b, st_b = b.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend=backend)
        np.testing.assert_array_equal(out_a, out_b)
        for x, y in zip(st_a, st_b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_backends_refuse_a_reverse_time_loop() -> None:
    _, plan = compile_spec(SPECS / "qrnn.py")
    reverse = dataclasses.replace(plan, time_loop=TimeLoop(Direction.REVERSE))
    with pytest.raises(ValueError, match="backend cpu renders forward time loops, not reverse ones"):
        render_module(reverse, "specs/qrnn.py", "key")
