"""Analysis facts: hoisting, fusion into stages, epilogue placement, delay states, in-place updates."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import sympy

from cellgen.ir.analysis import analyse, delay_states, linear_order
from cellgen.build import build, compile_spec
from cellgen.dsl import INPUT_SIZE, NUM_UNITS
from cellgen.ir.plan import FusedPlan
from cellgen.frontend.spec import load_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
IN, H = INPUT_SIZE, NUM_UNITS


def plan_of(name: str) -> FusedPlan:
    return compile_spec(SPECS / f"{name}.py")[1]


def write_spec(tmp_path: Path, body: str, name: str = "cell.py") -> Path:
    path = tmp_path / name
    path.write_text("from cellgen.dsl import INPUT_SIZE, Cell, sigmoid, tanh\n" + textwrap.dedent(body))
    return path


def test_basic_lstm_one_hoisted_gemm_one_recurrent_gemm_one_epilogue() -> None:
    plan = plan_of("basic_lstm")
    assert plan.hoisted is not None
    assert plan.hoisted.direct_linears == ("kernel",) and plan.hoisted.delayed_linears == ()
    assert (plan.hoisted.rows, plan.hoisted.width) == (IN, 4 * H)
    assert len(plan.gemms) == 1
    gemm = plan.gemms[0]
    assert (gemm.stage, gemm.linears, gemm.direct_state) == (0, ("kernel",), "h")
    assert (gemm.rows, gemm.width) == (H, 4 * H)
    assert gemm.operand_buffer is None  # h is read in place, no copy
    assert [e.index for e in plan.epilogues] == [1]
    assert plan.schedule() == [("gemm", 0), ("epilogue", 1)]
    assert not plan.scan_only


def test_basic_rnn() -> None:
    plan = plan_of("basic_rnn")
    assert plan.hoisted.direct_linears == ("kernel",)
    assert [g.linears for g in plan.gemms] == [("kernel",)]
    assert [e.index for e in plan.epilogues] == [1]


def test_lstm_projection_is_a_second_stage() -> None:
    plan = plan_of("lstm")
    num_proj = sympy.Symbol("num_proj", positive=True, integer=True)
    assert plan.hoisted.direct_linears == ("kernel",)  # the projection reads m, never x: not hoisted
    assert [(g.stage, g.linears) for g in plan.gemms] == [(0, ("kernel",)), (1, ("projection/kernel",))]
    assert (plan.gemms[0].rows, plan.gemms[0].width) == (num_proj, 4 * H)
    assert plan.gemms[1].direct_state is None and plan.gemms[1].operand_buffer == "opnd1"
    assert (plan.gemms[1].rows, plan.gemms[1].width) == (H, num_proj)
    assert [e.index for e in plan.epilogues] == [1, 2]
    assert plan.unit_params == ("w_f_diag", "w_i_diag", "w_o_diag")


def test_tf_gru_one_hoisted_gemm_two_recurrent_stages() -> None:
    plan = plan_of("gru")
    spec = plan.spec
    assert plan.hoisted.direct_linears == ("gates/kernel", "candidate/kernel")  # both x parts: ONE GEMM
    assert plan.hoisted.width == 3 * H
    assert [(b.kernel, b.dest_col, b.width) for b in plan.hoisted.blocks] == [
        ("gates/kernel", 0, 2 * H), ("candidate/kernel", 2 * H, H)]
    assert [b.bias for b in plan.hoisted.biases] == ["gates/bias", "candidate/bias"]
    assert [(g.stage, g.linears) for g in plan.gemms] == [(0, ("gates/kernel",)), (1, ("candidate/kernel",))]
    assert plan.gemms[0].direct_state == "h"
    r_pre = next(g for lin in spec.linears for g in lin.gates if str(g) == "r_pre")
    h = spec.state("h").symbol
    (operand,) = plan.gemms[1].operands
    assert operand.expr.free_symbols == {h, r_pre}  # r * h: needs GEMM 0 first
    assert [b.row_start for b in plan.gemms[1].blocks] == [IN]  # candidate/kernel's h rows
    assert [e.index for e in plan.epilogues] == [1, 2]
    assert plan.schedule() == [("gemm", 0), ("epilogue", 1), ("gemm", 1), ("epilogue", 2)]


def test_gru_cudnn_recurrent_bias_goes_to_the_epilogue() -> None:
    plan = plan_of("gru_cudnn")
    assert plan.hoisted.direct_linears == ("input/kernel",)
    assert [b.bias for b in plan.hoisted.biases] == ["input/bias"]
    assert [g.linears for g in plan.gemms] == [("recurrent/kernel",)]
    assert plan.epilogue_biases == ("recurrent/bias",)
    reads = {str(i.base) for e in plan.epilogues for lp in e.loops for s in lp.stores
             for i in s.value.atoms(sympy.Indexed)}
    reads |= {str(i.base) for e in plan.epilogues for lp in e.loops for _, t in lp.temps
              for i in t.atoms(sympy.Indexed)}
    assert "p_recurrent_bias" in reads


def test_qrnn_is_one_hoisted_gemm_and_a_scan() -> None:
    plan = plan_of("qrnn")
    assert plan.gemms == () and plan.scan_only
    assert plan.delay_states == ("x_prev",) and plan.recurrent_states == ("c",)
    h = plan.hoisted
    assert h.direct_linears == ("kernel",) and h.delayed_linears == ("kernel",) and h.delayed
    assert h.width == 6 * H
    assert [(b.row_start, b.dest_col, b.delayed) for b in h.blocks] == [(0, 0, False), (IN, 3 * H, True)]
    assert [b.bias for b in h.biases] == ["bias"]  # the bias is added once, on the x_t part
    assert [e.index for e in plan.epilogues] == [0]
    assert plan.uses_x_prev is False  # x_{t-1} reaches the scan only through pre_prev


def test_window_one_qrnns_are_scans_without_delay() -> None:
    for name in ("qrnn_f", "qrnn_ifo"):
        plan = plan_of(name)
        assert plan.scan_only and plan.delay_states == ()
        assert plan.hoisted.direct_linears == ("kernel",)


def test_delay_state_detection() -> None:
    assert delay_states(load_spec(SPECS / "qrnn.py")) == ("x_prev",)
    for name in ("lstm", "gru", "qrnn_f"):
        assert delay_states(load_spec(SPECS / f"{name}.py")) == ()


def test_shipped_states_are_updated_in_place() -> None:
    for name in ("basic_rnn", "basic_lstm", "gru", "gru_cudnn", "lstm", "qrnn", "qrnn_f", "qrnn_ifo"):
        assert plan_of(name).double_buffered == ()


def test_linears_on_the_same_operand_fuse_into_one_gemm(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, """
        cell = Cell("two")
        x = cell.input()
        h = cell.state("h")
        c = cell.state("c")
        a = cell.linear([x, h], gates=("a",), kernel="a/kernel", bias="a/bias")
        b1, b2 = cell.linear([h, x], gates=("b1", "b2"), kernel="b/kernel", bias="b/bias")
        d = cell.linear([x, h, c], gates=("d",), kernel="d/kernel", bias=None)
        cell.update(h, tanh(a + b1))
        cell.update(c, sigmoid(b2) * c + d)
        cell.output(h)
    """))
    plan = analyse(spec)
    assert plan.hoisted.direct_linears == ("a/kernel", "b/kernel", "d/kernel")
    assert [(b.kernel, b.row_start, b.dest_col) for b in plan.hoisted.blocks] == [
        ("a/kernel", 0, 0), ("b/kernel", H, H), ("d/kernel", 0, 3 * H)]
    (gemm,) = plan.gemms  # every recurrent part is at stage 0: ONE GEMM, concatenated weights
    assert gemm.linears == ("a/kernel", "b/kernel", "d/kernel")
    assert [o.label for o in gemm.operands] == ["h", "c"]
    assert (gemm.rows, gemm.width) == (2 * H, 4 * H)
    assert gemm.direct_state is None and gemm.operand_buffer == "opnd0"
    assert [(b.kernel, b.row_start, b.dest_row, b.dest_col) for b in gemm.blocks] == [
        ("a/kernel", IN, 0, 0), ("b/kernel", 0, 0, H), ("d/kernel", IN, 0, 3 * H), ("d/kernel", IN + H, H, 3 * H)]
    # [h, c] is packed in a prologue epilogue 0, before GEMM 0
    assert [e.index for e in plan.epilogues] == [0, 1]


def test_linear_order_is_topological(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, """
        import sympy
        cell = Cell("order")
        x = cell.input()
        h = cell.state("h")
        later_gate = sympy.Symbol("g", real=True)  # the gate of the linear declared next
        first = cell.linear([x, tanh(later_gate)], gates=("f",), kernel="first/kernel", bias=None)
        g = cell.linear([x, h], gates=("g",), kernel="second/kernel", bias=None)
        cell.update(h, tanh(first + g))
        cell.output(h)
    """))
    assert [lin.kernel for lin in spec.linears] == ["first/kernel", "second/kernel"]
    assert [lin.kernel for lin in linear_order(spec)] == ["second/kernel", "first/kernel"]
    plan = analyse(spec)
    assert [(g.stage, g.linears) for g in plan.gemms] == [(0, ("second/kernel",)), (1, ("first/kernel",))]
    gru = load_spec(SPECS / "gru.py")
    assert [lin.kernel for lin in linear_order(gru)] == ["gates/kernel", "candidate/kernel"]


DOUBLE_BUFFER = """
    cell = Cell("dbuf")
    x = cell.input()
    h = cell.state("h")
    c = cell.state("c")
    a = cell.linear([x, h], gates=("a",), kernel="a/kernel", bias="a/bias")
    b = cell.linear([x, tanh(a)], gates=("b",), kernel="b/kernel", bias="b/bias")
    cell.update(h, tanh(a))           # after GEMM 0
    cell.update(c, c + h * tanh(b))   # after GEMM 1, reads the OLD h
    cell.output(cell.updated(c))
"""


def _dbuf_reference(p: dict, xs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand-derived from the equations above (not from cellgen): batch-major dynamic_rnn."""
    bsz, steps, _ = xs.shape
    units = p["a/bias"].shape[0]
    h, c = np.zeros((bsz, units)), np.zeros((bsz, units))
    out = np.zeros((bsz, steps, units))
    for t in range(steps):
        x = xs[:, t]
        a = np.concatenate([x, h], axis=1) @ p["a/kernel"] + p["a/bias"]
        b = np.concatenate([x, np.tanh(a)], axis=1) @ p["b/kernel"] + p["b/bias"]
        h_new, c_new = np.tanh(a), c + h * np.tanh(b)
        live = (t < lengths)[:, None]
        out[:, t] = np.where(live, c_new, 0.0)
        h, c = np.where(live, h_new, h), np.where(live, c_new, c)
    return out, h, c


def test_a_state_read_after_its_update_is_double_buffered(tmp_path: Path) -> None:
    path = write_spec(tmp_path, DOUBLE_BUFFER, "dbuf.py")
    plan = compile_spec(path)[1]
    assert plan.double_buffered == ("h",)  # c is updated last: in place
    assert [e.index for e in plan.epilogues] == [1, 2]

    (result,) = build([path], out_dir=tmp_path / "out")
    module_spec = importlib.util.spec_from_file_location("cellgen_test_dbuf", result.target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    params = {k: rng.uniform(-0.8, 0.8, v) for k, v in module.param_shapes(3, 4).items()}
    xs = rng.standard_normal((5, 6, 3))
    lengths = np.array([6, 0, 2, 5, 6])
    want_out, want_h, want_c = _dbuf_reference(params, xs, lengths)
    for backend in ("cpu", "reference"):
        out, (h, c) = module.dynamic_rnn(params, xs, sequence_length=lengths, backend=backend)
        np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(h, want_h, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(c, want_c, rtol=1e-10, atol=1e-10)
