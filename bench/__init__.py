"""Benchmarks: `bench/run` runs them all and prints the table docs/benchmarks.md shows."""
