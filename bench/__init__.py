"""Benchmarks of memtx_ops: ``python -m bench`` (the report) and ``pytest bench/ --benchmark-only``."""
