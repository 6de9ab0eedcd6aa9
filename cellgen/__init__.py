"""cellgen: compile RNN cell specs (SymPy gate equations) into fused Numba kernels.

Pipeline: spec file --load--> CellSpec --analyse--> FusedPlan --passes--> FusedPlan
--print/render--> generated/<name>.py. See docs/architecture.md.
"""

__version__ = "0.1.0"

from cellgen.runtime.stack import multi_rnn  # noqa: E402

__all__ = ["__version__", "multi_rnn"]
