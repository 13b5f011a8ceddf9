"""Benchmarks: `python bench/reuse_benchmark.py` reproduces Castro et al.'s layer-reuse experiment."""
