"""Benchmarks for celery_dlock, run with ``python -m benchmarks``.

Each scenario is one module that builds its variants and hands them to the
shared harness, which times them in interleaved rounds on redis-server
nodes of its own:

1. ``latency``: uncontended acquire and release;
2. ``handoff``: release to next owner on a contended key;
3. ``drain``: a real prefork worker draining a queue (``workers`` runs it,
   ``celery_app`` is its app);
4. ``contention``: the busy policies draining one key;
5. ``memory``: a process holding many auto-extended locks
   (``memory_probe`` is that process).

``__main__`` picks the scenarios, prints their markdown tables and writes
``RESULTS.md`` and plots.
"""
