"""Issue 9 §1: legal specs that once computed wrong numbers on the CPU backend, each against NumPy
written here from the spec's equations (never from generated code), on cpu and reference.

* a state stored in place and then read: ``cell.output(h)`` after ``cell.update(h, ...)`` is the
  value BEFORE the step, and so is ``cell.update(q, h)``;
* spec names that are also the generator's own names (``b``, ``j``, ``t``, ``out``, ``lengths``,
  ``np``, ``pre_t``, ``lambda``, ``num_units`` as hyperparameters, ``j`` as a size, states ``h`` and
  ``h_new``, parameters ``rec_bias`` and ``rec/bias``...) live in their own namespaces;
* a size relation of the spec (``cell.input(size=NUM_UNITS)``) is checked at call time.
"""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from cellgen.build import build

HEAD = """from cellgen.dsl import Cell, tanh, sigmoid, NUM_UNITS
cell = Cell({name!r}); x = cell.input(); h = cell.state("h")
g = cell.linear([x, h], gates=("g",), kernel="k", bias="b")
"""
_counter = itertools.count()
TOL = {np.float32: 1e-5, np.float64: 1e-10}


def build_module(tmp_path: Path, body: str, head: str = HEAD) -> ModuleType:
    """Build a spec into its own package under tmp_path and import it."""
    name = f"ns_cell_{next(_counter)}"
    spec = tmp_path / f"{name}.py"
    spec.write_text(head.format(name=name) + body)
    package = f"gen_ns_{name}"
    build([spec], tmp_path / package)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"{package}.{name}")
    finally:
        sys.path.remove(str(tmp_path))


def data(dtype, batch: int = 3, steps: int = 5, width: int = 3, units: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((batch, steps, width)).astype(dtype)
    lengths = np.array([steps, 0, steps - 2][:batch])
    return rng, xs, lengths


def run_both(m: ModuleType, params, xs, lengths, hyper: dict | None = None):
    return [m.dynamic_rnn(params, xs, sequence_length=lengths, backend=backend, **(hyper or {}))
            for backend in ("cpu", "reference")]


def loop(xs, lengths, h0, step):
    """TF dynamic_rnn around ``step(x_t, state) -> (out, state)``: zero outputs, frozen states past a length."""
    batch, steps, _ = xs.shape
    state, outs = h0, []
    for t in range(steps):
        out, new = step(xs[:, t], state)
        active = (t < lengths)[:, None]
        outs.append(np.where(active, out, 0))
        state = tuple(np.where(active, n, s) for n, s in zip(new, state, strict=True))
    return np.stack(outs, axis=1), state


def close(actual, expected, dtype) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_output_of_an_updated_state_is_its_old_value(tmp_path: Path, dtype) -> None:
    m = build_module(tmp_path, "cell.update(h, tanh(g)); cell.output(h)\n")
    p = m.init_params(3, 4, seed=0, dtype=dtype)
    _, xs, lengths = data(dtype)
    k, b = (p[n].astype(np.float64) for n in ("k", "b"))

    def step(x, s):
        (h,) = s
        return h, (np.tanh(np.concatenate([x, h], 1) @ k + b),)

    want_out, (want_h,) = loop(xs.astype(np.float64), lengths, (np.zeros((3, 4)),), step)
    for out, state in run_both(m, p, xs, lengths):
        close(out, want_out, dtype)
        close(state.h, want_h, dtype)
    assert np.any(want_out != 0) and np.any(want_out[0, 1] != want_h[0])  # the old and new values differ


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_a_state_copied_from_an_updated_state_takes_its_old_value(tmp_path: Path, dtype) -> None:
    m = build_module(tmp_path, 'q = cell.state("q")\ncell.update(h, tanh(g)); cell.update(q, h); cell.output(q + h)\n')
    p = m.init_params(3, 4, seed=1, dtype=dtype)
    rng, xs, lengths = data(dtype, seed=1)
    h0, q0 = (rng.standard_normal((3, 4)).astype(dtype) for _ in range(2))
    k, b = (p[n].astype(np.float64) for n in ("k", "b"))

    def step(x, s):
        h, q = s
        return q + h, (np.tanh(np.concatenate([x, h], 1) @ k + b), h)

    want_out, want = loop(xs.astype(np.float64), lengths, (h0.astype(np.float64), q0.astype(np.float64)), step)
    for backend in ("cpu", "reference"):
        out, state = m.dynamic_rnn(p, xs, sequence_length=lengths, initial_state=(h0, q0), backend=backend)
        close(out, want_out, dtype)
        close(state.h, want[0], dtype)
        close(state.q, want[1], dtype)


#: Hyperparameter names the generated code once used for itself (loop variables, arguments,
#: modules, views), each with its own value so that a shadowed one changes the numbers.
GENERATOR_NAMES = ("b", "j", "t", "T", "B", "out", "lengths", "num_units", "np", "math", "pre_t", "x_t", "xs",
                   "w_in", "sizes", "dtype", "t0", "_v0", "s_h", "hy_a", "n_num_units", "lambda", "class")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_hyperparameters_named_like_the_generators_names(tmp_path: Path, dtype) -> None:
    values = {n: 0.05 * (k + 1) for k, n in enumerate(GENERATOR_NAMES)}
    decls = "".join(f"hy{k} = cell.hyper({n!r}, {v})\n" for k, (n, v) in enumerate(values.items()))
    total = " + ".join(f"{k + 1}*hy{k}" for k in range(len(values)))
    m = build_module(tmp_path, decls + f"cell.update(h, tanh(g) * ({total}))\ncell.output(h)\n")
    p = m.init_params(3, 4, seed=2, dtype=dtype)
    _, xs, lengths = data(dtype, seed=2)
    k, b = (p[n].astype(np.float64) for n in ("k", "b"))
    given = {n: v * 1.5 for n, v in values.items()}  # not the defaults
    scale = sum((i + 1) * given[n] for i, n in enumerate(GENERATOR_NAMES))

    def step(x, s):
        (h,) = s
        new = np.tanh(np.concatenate([x, h], 1) @ k + b) * scale
        return h, (new,)

    want_out, (want_h,) = loop(xs.astype(np.float64), lengths, (np.zeros((3, 4)),), step)
    for out, state in run_both(m, p, xs, lengths, given):
        close(out, want_out, dtype)
        close(state.h, want_h, dtype)


def test_sizes_states_and_params_named_like_the_generators_names(tmp_path: Path) -> None:
    """A size ``j`` (the unit loop's variable), a state ``h_new`` beside a double-buffered ``h``,
    a state ``lengths``, a per-unit parameter ``rec_bias`` beside a bias ``rec/bias`` (both once the kernel
    array ``p_rec_bias``) and a third ``rec_bias_2`` would once shadow or collide."""
    body = """J = cell.size("j")
hn = cell.state("h_new")
z = cell.state("lengths", size=J)
u = cell.linear([x, z], gates=("u",), kernel="w/u", bias="rec/bias", size=J)
d = cell.param("rec_bias")
e = cell.param("rec_bias_2", size=J)
cell.update(z, tanh(u + e))
cell.update(hn, h * d)
cell.update(h, tanh(g + hn))
cell.output(h + hn)
"""
    m = build_module(tmp_path, body)
    dtype = np.float64
    p = m.init_params(3, 4, j=2, seed=3, dtype=dtype)
    assert sorted(p) == ["b", "k", "rec/bias", "rec_bias", "rec_bias_2", "w/u"]
    rng, xs, lengths = data(dtype, seed=3)
    state0 = tuple(rng.standard_normal((3, n)) for n in m.state_size(4, j=2))

    def step(x, s):
        h, hn, z = s
        new_z = np.tanh(np.concatenate([x, z], 1) @ p["w/u"] + p["rec/bias"] + p["rec_bias_2"])
        new_h = np.tanh(np.concatenate([x, h], 1) @ p["k"] + p["b"] + hn)
        return h + hn, (new_h, h * p["rec_bias"], new_z)

    want_out, want = loop(xs, lengths, state0, step)
    for backend in ("cpu", "reference"):
        out, state = m.dynamic_rnn(p, xs, sequence_length=lengths, initial_state=state0, backend=backend)
        close(out, want_out, dtype)
        for a, e in zip(state, want, strict=True):
            close(a, e, dtype)


HIGHWAY = """from cellgen.dsl import Cell, tanh, sigmoid, NUM_UNITS
cell = Cell({name!r}); x = cell.input(size=NUM_UNITS); c = cell.state("c")
z, f = cell.linear([x], gates=("z", "f"), kernel="k", bias="b")
cell.update(c, sigmoid(f) * c + (1 - sigmoid(f)) * z)
cell.output(tanh(c) + x)
"""


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_an_input_declared_num_units_wide_is_checked(tmp_path: Path, backend: str) -> None:
    m = build_module(tmp_path, "", head=HIGHWAY)
    p = m.init_params(4, 4, seed=4)
    rng = np.random.default_rng(4)
    good = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out, _ = m.dynamic_rnn(p, good, backend=backend)
    assert out.shape == (2, 3, 4)
    for width in (3, 5):
        with pytest.raises(ValueError, match=rf"inputs must have last dimension num_units = 4 .* got {width}"):
            m.dynamic_rnn(p, rng.standard_normal((2, 3, width)).astype(np.float32), backend=backend)


def test_an_input_declared_num_units_wide_matches_numpy(tmp_path: Path) -> None:
    m = build_module(tmp_path, "", head=HIGHWAY)
    dtype = np.float64
    p = m.init_params(4, 4, seed=5, dtype=dtype)
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((3, 6, 4))
    lengths = np.array([6, 0, 2])

    def step(x, s):
        (c,) = s
        zf = x @ p["k"] + p["b"]
        z, f = zf[:, :4], 1 / (1 + np.exp(-zf[:, 4:]))
        new = f * c + (1 - f) * z
        return np.tanh(c) + x, (new,)  # the spec's c is the value before the step

    want_out, (want_c,) = loop(xs, lengths, (np.zeros((3, 4)),), step)
    for out, state in run_both(m, p, xs, lengths):
        close(out, want_out, dtype)
        close(state.c, want_c, dtype)


def test_a_cell_with_no_num_units_vector_runs(tmp_path: Path) -> None:
    """Nothing is num_units wide: num_units is not needed (once a KeyError on every call)."""
    head = """from cellgen.dsl import Cell, tanh, INPUT_SIZE
cell = Cell({name!r}); x = cell.input(); h = cell.state("h", size=INPUT_SIZE)
g = cell.linear([x, h], gates=("g",), kernel="k", bias="b", size=INPUT_SIZE)
cell.update(h, tanh(g)); cell.output(h * 2)
"""
    m = build_module(tmp_path, "", head=head)
    p = m.init_params(3, 7, seed=6, dtype=np.float64)
    assert p["k"].shape == (6, 3)
    xs = np.random.default_rng(6).standard_normal((2, 4, 3))

    def step(x, s):
        (h,) = s
        new = np.tanh(np.concatenate([x, h], 1) @ p["k"] + p["b"])
        return h * 2, (new,)

    want_out, (want_h,) = loop(xs, np.array([4, 4]), (np.zeros((2, 3)),), step)
    for out, state in run_both(m, p, xs, None):
        close(out, want_out, np.float64)
        close(state.h, want_h, np.float64)
