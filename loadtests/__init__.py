"""Load tests and benchmarks (see docs/BENCHMARKS.md)."""
