"""Issue 9 §3: NaN and inf propagate like the reference (docs/generated-api.md, "NaN and inf").

For every shipped spec and dtype, a NaN or an inf placed in each kind of input (the inputs, a
bias or other parameter, the initial state, a hyperparameter) gives NaN, inf and finite values
at the same places on the cpu backend as on the reference backend and the independent oracle
(tests/references.py), finite values within the usual tolerance. The float32 kernels' rational
tanh once clamped NaN to -1, the printed ``min``/``max`` turned NaN into a clip bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import references as ref
from test_numeric import DTYPES, HYPER, SPECS, TOL, module, setup

#: Where a special value goes: each input kind of each spec (a hyperparameter where it has one).
PLACES = [(name, place) for name in SPECS for place in ("inputs", "param", "state", "hyper")
          if place != "hyper" or name in HYPER]


def _poison(name: str, dtype, place: str, value: float):
    params, inputs, lengths, state = setup(name, dtype, batch=4, steps=5, seed=11)
    lengths[:] = [5, 3, 0, 5]
    hyper = dict(HYPER.get(name, {}))
    if place == "inputs":
        inputs[1, 1, 0] = value
    elif place == "param":
        key = sorted(params)[0]  # a kernel or bias, by TF name
        flat = params[key].reshape(-1)
        flat[flat.size // 2] = value
    elif place == "state":
        state = tuple(s.copy() for s in state)
        state[0][0, 0] = value
    else:
        hyper[sorted(module(name).HYPER)[0]] = value
    return params, inputs, lengths, state, hyper


def _same_specials(actual, expected, dtype, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN at other places")
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=f"{what}: +inf elsewhere")
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{what}: -inf elsewhere")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=TOL[dtype], atol=TOL[dtype], err_msg=what)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's "invalid value": the point of the test
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("name", "place"), PLACES)
def test_specials_propagate_like_the_reference(name: str, dtype, place: str, value: float) -> None:
    m = module(name)
    params, inputs, lengths, state, hyper = _poison(name, dtype, place, value)
    want_out, want_state = ref.dynamic_rnn(name, params, inputs, lengths, state, **hyper)
    for backend in ("reference", "cpu"):
        out, final = m.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, backend=backend,
                                   **hyper)
        _same_specials(out, want_out, dtype, f"{backend} outputs")
        for k, (a, e) in enumerate(zip(final, want_state, strict=True)):
            _same_specials(a, e, dtype, f"{backend} state {m.STATE[k]}")
    if value != value:  # a NaN reaches the outputs (it is not silently clipped away)
        assert np.isnan(want_out).any() or np.isnan(np.concatenate([s.ravel() for s in want_state])).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_nan_clip_gives_nan(dtype) -> None:
    """lstm's cell_clip=NaN: NaN cells and outputs, as np.clip(c, -nan, nan) gives (not a finite clip)."""
    m = module("lstm")
    params, inputs, lengths, state = setup("lstm", dtype, seed=12)
    out, final = m.dynamic_rnn(params, inputs, sequence_length=lengths, initial_state=state, cell_clip=np.nan)
    active = lengths > 0
    assert np.isnan(final.c[active]).all() and np.isnan(out[active, 0]).all()
    assert not np.isnan(final.c[~active]).any(), "a length-0 row keeps its initial state"
