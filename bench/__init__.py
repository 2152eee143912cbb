"""Benchmarks: each prints its results and commits them as a table."""
