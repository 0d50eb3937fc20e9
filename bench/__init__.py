"""Benchmarks of the selflengthen pipeline: `python bench/run.py` (or `make bench`); see bench/run.py."""
