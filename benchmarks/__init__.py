"""Benchmarks of pgstagechain (``python benchmarks/run.py``); see docs/benchmarks.md."""
