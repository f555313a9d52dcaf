"""batchd benchmarks: ``python -m benchmarks [--quick] [--only NAME] [--json PATH]``; not collected by pytest.

Every figure is a ratio against a reference measured in the same run, or a resource bound; nothing here
asserts times in CI (see docs/performance.md for the figures and how they were taken).
"""
