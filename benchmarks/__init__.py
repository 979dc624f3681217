"""Benchmarks for celery_dlock, run with ``python -m benchmarks``.

Each scenario is one module (``latency`` is scenario 1) that builds its
variants and hands them to the shared harness, which times them in
interleaved rounds on redis-server nodes of its own.  ``__main__`` picks the
scenarios, prints their markdown tables and writes ``RESULTS.md`` and plots.
"""
