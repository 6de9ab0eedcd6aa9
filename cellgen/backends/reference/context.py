"""The reference backend's template context: the spec's equations unfused, one NumPy step.

The reference backend is the oracle of the generated module itself (a step in plain NumPy, no
fusion, no hoisting); the tests' independent references live in ``tests/references.py``.
"""

from __future__ import annotations

from typing import Any

from cellgen.codegen.printing import NumPyVectorPrinter
from cellgen.ir.analysis import linear_order
from cellgen.ir.plan import FusedPlan

def context(plan: FusedPlan) -> dict[str, Any]:
    """Everything ``templates/reference/kernels.py.j2`` needs: the unfused spec printed for NumPy."""
    spec, p = plan.spec, NumPyVectorPrinter()
    order = linear_order(spec)
    linears = [{"operands": [p.doprint(o) for o in lin.operands], "kernel": lin.kernel, "bias": lin.bias,
                "gates": [str(g) for g in lin.gates]} for lin in order]
    return {
        "linears": linears,
        "updates": [p.doprint(expr) for _, expr, _ in spec.updates],
        "output": p.doprint(spec.output),
        "unit_params": [v.name for v in spec.params],
    }

