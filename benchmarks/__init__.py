"""d3arrow benchmarks: pytest-benchmark tests, asv suites and ``python -m benchmarks.compare``."""
