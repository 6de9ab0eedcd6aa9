"""The CPU backend: context (``context.py``), runtime (``gemm``: the packed GEMM micro-kernel,
``pool``: the threading layer and the process-wide region lock, ``sync``: barriers).

Imported by generated code: light (the context module is imported only by the compiler)."""
