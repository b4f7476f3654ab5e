"""Fakes at the seams, shared by the test suites (and benchmarks): real servers on loopback."""
