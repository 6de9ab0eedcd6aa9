"""The fuzzers' examples as several tests (shards), shared by tests/test_fuzz.py and tests/test_training_fuzz.py.

Shard ``k`` of a fuzzer runs a ``1/SHARDS`` of its examples under hypothesis seed ``SEED * SHARDS + k``, so a
failure names its shard, a run is reproducible, and pytest-xdist workers share the shards out.
``CELLGEN_FUZZ_SEED`` picks another sequence, ``CELLGEN_FUZZ_EXCLUDE`` leaves bug classes out and
``CELLGEN_FUZZ_SHRINK=1`` shrinks a counterexample (off by default: shrinking rebuilds many specs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from fuzz_specs import specs
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

EXCLUDE = frozenset(c for c in os.environ.get("CELLGEN_FUZZ_EXCLUDE", "").split(",") if c)
SEED = int(os.environ.get("CELLGEN_FUZZ_SEED", "0"))
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("CELLGEN_FUZZ_SHRINK") else [])
#: the examples of a fuzzer run as this many tests
SHARDS = 5


def fuzz_shards(name: str, examples: int, check: Callable[[Any, Any, pytest.TempPathFactory], None]
                ) -> dict[str, Callable[..., None]]:
    """``{name_k: test}`` for k < SHARDS: each test checks its share of ``examples`` random specs by
    ``check(fz, data, tmp_path_factory)`` (``data``: hypothesis draws of the example's own)."""
    def shard(index: int) -> Callable[..., None]:
        @seed(SEED * SHARDS + index)
        @settings(max_examples=-(-examples // SHARDS), deadline=None, database=None, derandomize=False,
                  print_blob=True, phases=PHASES,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
        @given(fz=specs(exclude=EXCLUDE), data=st.data())
        def test(fz, data, tmp_path_factory: pytest.TempPathFactory) -> None:
            check(fz, data, tmp_path_factory)

        test.__name__ = test.__qualname__ = f"{name}_{index}"
        return pytest.mark.long(test)

    return {f"{name}_{k}": shard(k) for k in range(SHARDS)}
