"""cellgen: compile RNN cell specs (SymPy gate equations) into fused Numba kernels.

Pipeline: spec file --load--> CellSpec --analyse--> FusedPlan --passes--> FusedPlan
--print/render--> generated/<name>.py. See docs/architecture.md.

``cellgen.load("lstm")`` / ``cellgen.load("path/to/spec.py")``: a shipped cell's or a spec file's
generated module, built into a keyed cache folder when needed (:mod:`cellgen.loader`).
"""

from cellgen.version import __version__

from cellgen.loader import load  # noqa: E402
from cellgen.runtime.stack import multi_rnn, multi_rnn_vjp  # noqa: E402

__all__ = ["__version__", "load", "multi_rnn", "multi_rnn_vjp"]
