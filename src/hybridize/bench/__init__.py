"""Benchmarks the project reports in docs/BENCHMARKS.md, run by `hybridize bench` (shapes, training throughput)."""
