"""The reference backend: the spec unfused in NumPy (``context.py``; runtime ``runtime.py``)."""
