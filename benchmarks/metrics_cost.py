"""What ``dlock_metrics=True`` adds to each locked run, in CPU time, measured in process.

The drain's throughput ratio of ours + metrics over ours cannot resolve 1%:
drains side by side differ by several percent from round to round.  So the
drain scenario also reports this: the thread CPU time of a run's metrics
work, the :class:`~celery_dlock.celery.events.RunWatch` of a run made from a
worker-like request, told of the grant and of the body's end, as
:mod:`celery_dlock.celery.guard` does for each run, with metrics on and off,
on real apps whose counters flush to the benchmark's lock server.  The
difference, the median over interleaved rounds, is set next to ours' whole
CPU time per task in the drain, which no timing of a drain can blur as much.
"""

from __future__ import annotations

import statistics
import time
import uuid

from celery import Celery
from celery.app.task import Context

from celery_dlock.celery.app_state import locks_for
from celery_dlock.celery.events import RunWatch

__all__ = ["metrics_cost_ns", "summary"]

#: The task label the probe's runs are counted under.
LABEL = "bench.metrics-probe"


def _cycle_ns(app: Celery, runs: int) -> float:
    """Thread CPU ns per run of ``runs`` runs' RunWatch work on ``app``."""
    locks = locks_for(app)
    lock = locks.redlock.acquire(f"bench:metrics-probe:{uuid.uuid4().hex}", 30.0)
    try:
        started = time.thread_time_ns()
        for _ in range(runs):
            # What a worker's request carries that RunWatch reads.
            request = Context(id="probe", hostname="probe@bench", headers={}, called_directly=False)
            watch = RunWatch(locks, LABEL, request)
            watch.granted(lock)
            watch.ended(lock, kept=False)
        return (time.thread_time_ns() - started) / runs
    finally:
        lock.release()


def metrics_cost_ns(locks_url: str, *, rounds: int, runs: int) -> dict[bool, list[float]]:
    """The CPU ns per run of the metrics work, by ``dlock_metrics`` (off, on), one figure per round, interleaved.

    ``locks_url`` is the lock server the counters flush to, as a worker's do.
    """
    apps = {}
    for metrics in (False, True):
        app = Celery(f"bench-metrics-{metrics}", broker="memory://", set_as_current=False)
        app.conf.update(dlock_redis_url=locks_url, dlock_metrics=metrics)
        apps[metrics] = app
        _cycle_ns(app, runs // 10 or 1)  # warm up: connections, scripts
    costs: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        for metrics in (False, True) if round_ % 2 else (True, False):
            costs[metrics].append(_cycle_ns(apps[metrics], runs))
    for app in apps.values():
        locks_for(app).redlock.close()
    return costs


def summary(costs: dict[bool, list[float]], task_cpu_ns: float) -> tuple[str, str, str, str]:
    """A cost row's cells: added µs (fastest on - fastest off), the median same-round difference, ours' µs, the share.

    The fastest round of each is the least disturbed by other processes, as
    ``timeit`` takes it; the median difference shows how much load blurred it.
    """
    added = min(costs[True]) - min(costs[False])
    median = statistics.median(on - off for on, off in zip(costs[True], costs[False], strict=True))
    return (f"{added / 1000:.2f}", f"{median / 1000:.2f}", f"{task_cpu_ns / 1000:.0f}", f"{added / task_cpu_ns:.2%}")
