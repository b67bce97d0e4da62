"""Benchmarks: scripts that write JSON under bench/results/ (never timed asserts in tests)."""
