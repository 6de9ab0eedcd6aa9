"""The spec writer's API (``from cellgen.dsl import Cell, sigmoid, tanh``): see :mod:`cellgen.frontend.dsl`."""

from cellgen.frontend.dsl import *  # noqa: F403
from cellgen.frontend.dsl import __all__  # noqa: F401
