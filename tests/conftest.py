"""Test-run plumbing: the long tests first; ``CELLGEN_TEST_SHARD=k/n`` keeps every n-th test from the k-th on.

Tests marked ``long`` (a minute or more on the 2-core machine: the fuzzers' shards, the simulator's and
SASS shards, whole-process runs) are moved to the front of the run, in their order, so that the test
workers (``-n auto --dist worksteal``) start them first and finish on short tests, not with one worker
still in a long one while the other waits (longest-first scheduling).

tests/test_cuda_backend.py::test_simulator_suite runs tests/cuda_sim_cases.py in fresh processes (the
simulator is chosen when numba.cuda is first imported) as a few such shards, so that pytest-xdist
workers share its minutes out; without the variable nothing is deselected.
"""

from __future__ import annotations

import os

import pytest

SHARD_VARIABLE = "CELLGEN_TEST_SHARD"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: long ones first
    shard = os.environ.get(SHARD_VARIABLE)
    if not shard:
        return
    index, count = (int(n) for n in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"{SHARD_VARIABLE}={shard}: want k/n with 0 <= k < n")
    keep = [item for k, item in enumerate(items) if k % count == index]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % count != index])
    items[:] = keep
