"""Hand-written runtime the generated modules share: argument checks, the dynamic_rnn driver,
reverse-by-length and parameter helpers. Nothing here depends on a particular cell.

Importing it first picks the process's threading layer (:mod:`cellgen.runtime.pool`), before
any parallel kernel is compiled or launched."""

from cellgen.runtime import pool  # noqa: F401  (first: the threading layer, before any kernel)

from cellgen.runtime.driver import (
    HOST,
    BackendRun,
    CellInfo,
    bidirectional_dynamic_rnn,
    cell_step,
    dynamic_rnn,
    reverse_sequence,
)
from cellgen.runtime.params import as_rows, check_params, init_params, size_from, take_sizes

__all__ = [
    "HOST", "BackendRun", "CellInfo", "as_rows", "bidirectional_dynamic_rnn", "cell_step", "check_params",
    "dynamic_rnn", "init_params", "reverse_sequence", "size_from", "take_sizes",
]
