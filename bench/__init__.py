"""Benchmarks: `python -m bench.<name>` (bench/RESULTS.md)."""
from runtime.openmp import prefer_passive_wait

prefer_passive_wait()  # before any benchmark imports torch (runtime/openmp.py)
