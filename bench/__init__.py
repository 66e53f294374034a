"""Benchmarks with in-run baselines (see docs/PERFORMANCE.md). Run ``python bench/run_all.py``."""
