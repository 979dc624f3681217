"""The Prometheus exporter behind ``celery dlock metrics``: shared counters and the live keyspace.

:class:`DLockCollector` is a ``prometheus_client`` collector that reads Redis
at each scrape: the counters hash every worker writes (``celery dlock
stats``), with the wait and hold histograms of :mod:`celery_dlock.celery.timings`,
and the locks and parked messages there are right now.  Nothing is kept
between scrapes, so any number of exporters give the same answer, and a
restarted one loses nothing.  :func:`serve` puts it on an HTTP port.

Series carry a ``task`` label and nothing per key, so their number grows
with the tasks, never with the keys.  ``prometheus_client`` is the
``metrics`` extra: ``pip install 'celery-dlock[metrics]'``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Final

from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from ..celery.app_state import locks_for
from ..celery.timings import HISTOGRAMS, histograms, is_histogram_event
from ..lock.errors import LockUnavailable
from .inspect import held_locks, parked_by_task

__all__ = ["COUNTERS", "DEFAULT_PORT", "DLockCollector", "serve"]

#: The port ``celery dlock metrics`` listens on unless told otherwise.
DEFAULT_PORT: Final = 9808

#: The counters always exported (at 0 until they happen), with their help text.
#: Any other event found in the counters hash is exported too.
COUNTERS: Final[Mapping[str, str]] = {
    "acquired": "Locks granted to runs of the task.",
    "busy": "Lock attempts that found the key held (one per attempt).",
    "requeued": "Runs requeued because their key was held or Redis was unreachable.",
    "skipped": "Runs skipped because their key was held (on_busy=skip).",
    "parked": "Runs parked in their key's handoff queue (on_busy=queue or coalesce).",
    "coalesced": "Runs folded into a parked run of the same key (on_busy=coalesce).",
    "lost": "Locks lost while the body ran.",
    "released": "Locks released by their holder.",
    "duplicate": "Duplicates turned away when published.",
}

_HISTOGRAM_HELP: Final = {
    "wait_seconds": "Seconds from a message's first delivery to its lock's grant, across requeues and parking.",
    "hold_seconds": "Seconds a run held its lock, from the grant to the end of its body.",
}


class DLockCollector(Collector):
    """Reads ``app``'s lock nodes at each scrape and yields the ``celery_dlock_*`` metrics.

    ``celery_dlock_up`` is 1 when the nodes answered; when none did, it is 0
    and nothing else is yielded, so that a Redis outage is not read as every
    counter falling to zero.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        """The metrics as they are now."""
        up = GaugeMetricFamily("celery_dlock_up", "Whether the lock nodes answered this scrape.")
        try:
            counters = locks_for(self.app).redlock.stats()
            held = Counter(lock.task or "-" for lock in held_locks(self.app))
            parked = parked_by_task(self.app)
        except (LockUnavailable, RedisError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._counters(counters)
        for name in HISTOGRAMS:
            family = HistogramMetricFamily(f"celery_dlock_{name}", _HISTOGRAM_HELP[name], labels=["task"])
            for task, counts in sorted(counters.items()):
                histogram = histograms(counts, name)
                if histogram is not None:
                    family.add_metric([task], histogram.buckets, histogram.total)
            yield family
        yield _gauge("celery_dlock_held_locks", "Locks held right now, by the task holding them.", held)
        yield _gauge("celery_dlock_parked_messages", "Messages parked in handoff queues right now.", parked)

    def _counters(self, counters: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
        found = {event for counts in counters.values() for event in counts if not is_histogram_event(event)}
        for event in [*COUNTERS, *sorted(found - set(COUNTERS))]:
            help_text = COUNTERS.get(event, f"Runs counted as {event!r}.")
            family = CounterMetricFamily(f"celery_dlock_{event}", help_text, labels=["task"])
            for task, counts in sorted(counters.items()):
                family.add_metric([task], counts.get(event, 0))
            yield family


def _gauge(name: str, help_text: str, values: Mapping[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["task"])
    for task, value in sorted(values.items()):
        family.add_metric([task], value)
    return family


def serve(app: Celery, port: int = DEFAULT_PORT, address: str = "0.0.0.0") -> Any:
    """Serve ``app``'s metrics on ``http://address:port/metrics`` from a daemon thread; returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DLockCollector(app))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
