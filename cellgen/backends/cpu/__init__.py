"""The CPU backend: context (``context.py``), runtime (``gemm``: the packed GEMM micro-kernel,
``sync``: barriers; the process's threading layer is :mod:`cellgen.runtime.pool`).

Imported by generated code: light (the context module is imported only by the compiler)."""
