"""Benchmarks behind ``tools/benchmark.py``: one module per area, shared timing helpers."""
