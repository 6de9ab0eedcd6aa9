"""Tools around the compiler, not stages of it: benchmarks, the SASS inspector, `show`, the demo."""
