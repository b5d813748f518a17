"""Throughput benchmarks of CrossFuse: reference against fast, with the machine's limits.

Run ``python -m bench --help``. Results go to ``bench/results.jsonl``; ``bench/RESULTS.md``
and its plots are generated from that file. Per-op pytest-benchmark suites live in
``bench/test_*.py`` (``python -m pytest bench --benchmark-only``). Nothing here is a test of
correctness: the suite in ``tests/`` is.
"""
