"""Measurement scripts (run as modules, e.g. `python -m benchmarks.kernels`) and their shared harness."""
