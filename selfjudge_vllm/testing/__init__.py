"""Fixtures shared by the tests and the benchmarks (tiny random models built locally)."""
