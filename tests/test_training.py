"""Training: every backward against central finite differences of the forward, in float64.

The loss is linear in the outputs and final states with random weights (tests/gradcheck.py), so
``backward(R, State(R_s...))`` must equal its gradient for every entry of every parameter, the
inputs and each initial state; relative error <= 1e-6 (docs/training.md). Cases have ragged
lengths with 0 and T among them and random initial states. The independent references (torch
autograd of nn.LSTM / nn.GRU and of eager PyTorch cells) are in tests/test_training_torch.py;
random specs in tests/test_training_fuzz.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import H, T, linear_loss, make_case, numeric_gradient, relative_error, run, vjp, weights

import cellgen
from cellgen.ir.analysis import analyse
from cellgen.ir.passes import run_passes

SHIPPED = ("basic_rnn", "basic_lstm", "gru", "gru_cudnn", "lstm", "qrnn", "qrnn_f", "qrnn_ifo")
BACKENDS = ("cpu", "reference")
TOL = 1e-6


def check_against_fd(loss, grads: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
    errors = {name: relative_error(grads[name], numeric_gradient(loss, values[name])) for name in values}
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative error above {TOL}: {bad}"


@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SHIPPED)
def test_gradients_equal_finite_differences(name: str, backend: str, time_major: bool) -> None:
    case = make_case(name, time_major=time_major)
    (out, state), backward = vjp(case, backend)
    r_out, r_states = weights(out, state)
    g = backward(r_out, case.mod.State(*r_states))

    def loss() -> float:
        return linear_loss(*run(case, backend), r_out, r_states)

    values = {**{f"params[{k}]": v for k, v in case.params.items()}, "inputs": case.inputs,
              **{f"initial_state.{n}": s for n, s in zip(case.mod.STATE, case.initial, strict=True)}}
    grads = {**{f"params[{k}]": v for k, v in g.params.items()}, "inputs": g.inputs,
             **{f"initial_state.{n}": s for n, s in zip(case.mod.STATE, g.initial_state, strict=True)}}
    check_against_fd(loss, grads, values)
    past = np.arange(T)[None, :] >= case.lengths[:, None]  # [B, T]: steps past each row's length
    d_inputs = g.inputs.transpose(1, 0, 2) if time_major else g.inputs
    assert not np.any(d_inputs[past]), "inputs past a row's length got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SHIPPED)
def test_bidirectional_gradients_equal_finite_differences(name: str, backend: str) -> None:
    case = make_case(name, seed=3)
    other = make_case(name, seed=4)
    mod = case.mod
    kw = dict(sequence_length=case.lengths, initial_state_fw=case.initial, initial_state_bw=other.initial,
              backend=backend, **case.hyper)
    ((out_fw, out_bw), (st_fw, st_bw)), backward = mod.bidirectional_dynamic_rnn_vjp(
        case.params, other.params, case.inputs, **kw)
    plain = mod.bidirectional_dynamic_rnn(case.params, other.params, case.inputs, **kw)
    np.testing.assert_array_equal(out_bw, plain[0][1])
    r_fw, rs_fw = weights(out_fw, st_fw, 1)
    r_bw, rs_bw = weights(out_bw, st_bw, 2)
    g = backward((r_fw, r_bw), (mod.State(*rs_fw), mod.State(*rs_bw)))

    def loss() -> float:
        (o_fw, o_bw), (s_fw, s_bw) = mod.bidirectional_dynamic_rnn(case.params, other.params, case.inputs, **kw)
        return linear_loss(o_fw, s_fw, r_fw, rs_fw) + linear_loss(o_bw, s_bw, r_bw, rs_bw)

    values = {**{f"fw[{k}]": v for k, v in case.params.items()}, **{f"bw[{k}]": v for k, v in other.params.items()},
              "inputs": case.inputs, **{f"fw.{n}": s for n, s in zip(mod.STATE, case.initial, strict=True)},
              **{f"bw.{n}": s for n, s in zip(mod.STATE, other.initial, strict=True)}}
    grads = {**{f"fw[{k}]": v for k, v in g.params_fw.items()}, **{f"bw[{k}]": v for k, v in g.params_bw.items()},
             "inputs": g.inputs, **{f"fw.{n}": s for n, s in zip(mod.STATE, g.initial_state_fw, strict=True)},
             **{f"bw.{n}": s for n, s in zip(mod.STATE, g.initial_state_bw, strict=True)}}
    check_against_fd(loss, grads, values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_layer_multi_rnn_gradients_equal_finite_differences(backend: str) -> None:
    """basic_lstm -> qrnn -> lstm (projection): each layer's inputs are the outputs below."""
    first = make_case("basic_lstm", seed=5)
    second = make_case("qrnn", seed=6, input_size=H)
    third = make_case("lstm", seed=7, input_size=H)
    layers = [(first.mod, first.params), (second.mod, second.params), (third.mod, third.params, third.hyper)]
    inits = [first.initial, second.initial, third.initial]
    kw = dict(sequence_length=first.lengths, initial_states=inits, backend=backend)
    (out, states), backward = cellgen.multi_rnn_vjp(layers, first.inputs, **kw)
    r_out, _ = weights(out, [], 8)
    r_states = [weights(out, s, 9 + k)[1] for k, s in enumerate(states)]
    g = backward(r_out, [layer[0].State(*r) for layer, r in zip(layers, r_states, strict=True)])

    def loss() -> float:
        o, sts = cellgen.multi_rnn(layers, first.inputs, **kw)
        return linear_loss(o, [s for st in sts for s in st], r_out, [r for rs in r_states for r in rs])

    values = {"inputs": first.inputs}
    grads = {"inputs": g.inputs}
    for k, (layer, init) in enumerate(zip(layers, inits, strict=True)):
        values |= {f"layer{k}[{n}]": v for n, v in layer[1].items()}
        grads |= {f"layer{k}[{n}]": v for n, v in g.params[k].items()}
        values |= {f"layer{k}.{n}": s for n, s in zip(layer[0].STATE, init, strict=True)}
        grads |= {f"layer{k}.{n}": s for n, s in zip(layer[0].STATE, g.initial_states[k], strict=True)}
    check_against_fd(loss, grads, values)


@pytest.mark.parametrize("name", SHIPPED)
def test_cpu_equals_reference_and_float32_is_close(name: str) -> None:
    """The fused backward against the unfused one (float64: 1e-12), and float32 within 1e-4 of float64."""
    grads = {}
    for dtype in (np.float64, np.float32):
        case = make_case(name, dtype=dtype, seed=11)
        for backend in BACKENDS:
            (out, state), backward = vjp(case, backend)
            r_out, r_states = weights(out, state)
            g = backward(r_out.astype(dtype), case.mod.State(*(r.astype(dtype) for r in r_states)))
            assert g.inputs.dtype == dtype and all(v.dtype == dtype for v in g.params.values())
            grads[backend, np.dtype(dtype).name] = {"inputs": g.inputs, **g.params,
                                                    **dict(zip(case.mod.STATE, g.initial_state, strict=True))}
    for key, want in grads["reference", "float64"].items():
        assert relative_error(grads["cpu", "float64"][key], want) <= 1e-12, key
        for backend in BACKENDS:
            assert relative_error(grads[backend, "float32"][key], want) <= 1e-4, (backend, key)


def test_backward_twice_is_a_clear_error() -> None:
    case = make_case("basic_lstm")
    (out, state), backward = vjp(case, "cpu")
    backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match="already called"):
        backward(np.ones_like(out))


def test_bad_adjoints_name_the_argument() -> None:
    case = make_case("basic_lstm")
    (out, state), backward = vjp(case, "cpu")
    with pytest.raises(ValueError, match=r"d_outputs must have the outputs' shape .*\(4, 5, 4\), got \(4, 5\)"):
        backward(np.ones(out.shape[:2]))
    with pytest.raises(ValueError, match=r"d_state must have 2 states \(c, h\), got 1"):
        backward(np.ones_like(out), (np.ones((4, 4)),))
    with pytest.raises(ValueError, match=r"d_state.h must have the final state's shape \(4, 4\), got \(4, 3\)"):
        backward(np.ones_like(out), case.mod.State(np.ones((4, 4)), np.ones((4, 3))))
    # a refused call leaves the backward usable
    g = backward(np.ones_like(out))
    assert g.inputs.shape == case.inputs.shape


def test_no_state_adjoint_means_zeros() -> None:
    case = make_case("gru")
    (out, state), backward = vjp(case, "cpu")
    r_out, _ = weights(out, state)
    g = backward(r_out)
    (_, _), again = vjp(case, "cpu")
    h = again(r_out, case.mod.State(np.zeros_like(state.h)))
    for k in g.params:
        np.testing.assert_array_equal(g.params[k], h.params[k])


@pytest.mark.parametrize("name", SHIPPED)
def test_recompute_gives_the_same_gradients(name: str) -> None:
    """recompute=True (block checkpoints, here 3 + 2 steps): the same numbers as saving every step."""
    case = make_case(name, seed=13)
    (out, state), backward = vjp(case, "cpu")
    (out_r, state_r), backward_r = vjp(case, "cpu", recompute=True)
    np.testing.assert_array_equal(out_r, out)
    for a, b in zip(state_r, state, strict=True):
        np.testing.assert_array_equal(a, b)
    r_out, r_states = weights(out, state)
    g, g_r = backward(r_out, case.mod.State(*r_states)), backward_r(r_out, case.mod.State(*r_states))
    assert relative_error(g_r.inputs, g.inputs) <= 1e-12
    for k in g.params:
        assert relative_error(g_r.params[k], g.params[k]) <= 1e-12, k
    for a, b in zip(g_r.initial_state, g.initial_state, strict=True):
        assert relative_error(a, b) <= 1e-12


@pytest.mark.parametrize("name", ["qrnn", "lstm", "gru"])
def test_recompute_gradients_equal_finite_differences(name: str) -> None:
    case = make_case(name, seed=17)
    (out, state), backward = vjp(case, "cpu", recompute=True)
    r_out, r_states = weights(out, state)
    g = backward(r_out, case.mod.State(*r_states))

    def loss() -> float:
        return linear_loss(*run(case, "cpu"), r_out, r_states)

    values = {**case.params, "inputs": case.inputs, **dict(zip(case.mod.STATE, case.initial, strict=True))}
    grads = {**g.params, "inputs": g.inputs, **dict(zip(case.mod.STATE, g.initial_state, strict=True))}
    check_against_fd(loss, grads, values)


@pytest.mark.parametrize("name", ["qrnn", "gru", "lstm"])
@pytest.mark.parametrize("batch,steps", [(0, 3), (2, 0), (1, 1)])
def test_empty_batch_or_time(name: str, batch: int, steps: int) -> None:
    mod = make_case(name).mod
    params = mod.init_params(3, H, dtype=np.float64, seed=0, **({"num_proj": 2} if name == "lstm" else {}))
    for backend in BACKENDS:
        for recompute in (False, True):
            (out, state), backward = mod.dynamic_rnn_vjp(params, np.ones((batch, steps, 3)), backend=backend,
                                                         recompute=recompute)
            g = backward(np.ones_like(out), mod.State(*(np.ones_like(s) for s in state)))
            assert g.inputs.shape == (batch, steps, 3)
            if steps == 0:  # nothing ran: the final states' adjoint is the initial states'
                assert all(np.all(d == 1) for d in g.initial_state)
                assert all(not np.any(v) for v in g.params.values())


# -- the plan's structure: what the forward saves and what a backward step computes -----------------
def _backward_expressions(tp) -> list:
    return [e for epi in tp.backward.epilogues for loop in epi.loops
            for e in [*(v for _, v in loop.temps), *(s.value for s in loop.stores)]]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_backward_reads_saved_activations_and_computes_no_transcendental(name: str) -> None:
    from cellgen.build import compile_spec
    from cellgen.ir.backward import ACTIVATIONS, training_plan

    spec, _ = compile_spec(f"specs/{name}.py")
    tp = training_plan(spec)
    found = set().union(*(e.atoms(*ACTIVATIONS) for e in _backward_expressions(tp)))
    assert not found, f"{name}'s backward recomputes {found}"
    activations = [sv for sv in tp.saved if sv.kind == "activation"]
    assert activations, f"{name} saves no activation"
    assert len({sv.value for sv in activations}) == len(activations), "an activation saved twice"
    # the forward computes no activation more than the plain forward does: each save shares the step's value
    assert _activations_computed(tp.forward) == _activations_computed(run_passes(analyse(spec)))


def _activations_computed(plan) -> int:
    from cellgen.ir.backward import ACTIVATIONS

    return sum(len(e.atoms(*ACTIVATIONS)) for epi in plan.epilogues for loop in epi.loops
               for e in [*(v for _, v in loop.temps), *(s.value for s in loop.stores)])


@pytest.mark.parametrize("name", SHIPPED)
def test_each_adjoint_is_read_once_per_loop(name: str) -> None:
    """Shared adjoints are formed once: a value produced twice (the output IS the new h) gets one summed
    adjoint, ``dout + ds_h``, and a value inside another (the new c inside the new h) one total adjoint
    that every gate's multiplies; so a loop of a backward step reads ``dout`` and each ``ds_<state>`` in
    one expression at most (the chain rule multiplied out reads them once per gate)."""
    import sympy

    from cellgen.build import compile_spec
    from cellgen.ir.backward import training_plan

    tp = training_plan(compile_spec(f"specs/{name}.py")[0])
    arrays = ["dout", *(f"ds_{s}" for s in tp.backward.recurrent_states)]
    for epi in tp.backward.epilogues:
        for loop in epi.loops:
            exprs = [*(v for _, v in loop.temps), *(s.value for s in loop.stores)]
            for array in arrays:
                reads = [e for e in exprs if any(str(i.base) == array for i in e.atoms(sympy.Indexed))]
                assert len(reads) <= 1, f"{name}: a backward loop reads {array} in {len(reads)} places: {reads}"
    if name in ("basic_lstm", "gru_cudnn", "basic_rnn"):  # output = new h
        j = sympy.Symbol("j", integer=True, nonnegative=True)
        assert any(e.has(sympy.Indexed("dout", j) + sympy.Indexed("ds_h", j)) for e in _backward_expressions(tp))
