"""The CUDA backend: context (``context.py``: kernels and launch layout from the plan) and runtime
(``runtime.py``: device arrays, uploads, copy kernels, the hoisted GEMM)."""
