"""batchd benchmarks: run one with ``python -m benchmarks.bench_<name>``; not collected by pytest.

Each compares batchd against a raw reference measured in the same run and prints ratios, never asserting
times (see docs/benchmarks.md for the figures and how they were taken).
"""
