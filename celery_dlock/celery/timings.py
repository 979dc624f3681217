"""Lock wait and hold times as histograms kept in the shared counters.

With ``dlock_metrics`` on, each run adds one observation of how long it
waited for its lock (from its message's first delivery to the grant, across
requeues and parking) and one of how long it held it.  An observation is two
counts in the process's :class:`~celery_dlock.lock.counters.Tally`: its
bucket, and its value in microseconds added to the sum.  So it costs a task
no Redis command; the counts reach the ``stats`` hash with the others, at
most a second later, where ``celery dlock metrics`` reads them back as
Prometheus histograms (:func:`histograms`).

The events are named ``<name>_le_<bound>`` and ``<name>_sum_us``, under the
task's name, beside ``acquired``, ``busy``...; :func:`is_histogram_event`
tells them apart, so ``celery dlock stats`` shows only the plain counts.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["BUCKETS", "HISTOGRAMS", "Histogram", "Observer", "histograms", "is_histogram_event", "observe"]

#: The upper bounds of the buckets, in seconds, shared by both histograms.
#: Lock waits across requeues run to minutes, so the top end goes past
#: Prometheus's default 10 s.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)

#: The histograms a run adds to.
HISTOGRAMS: Final = ("wait_seconds", "hold_seconds")

_BOUNDS: Final = tuple("+Inf" if bound == math.inf else format(bound, "g") for bound in BUCKETS)
_SUM: Final = "_sum_us"
#: Each histogram's bucket events, by bucket, made once rather than per observation.
_BUCKET_EVENTS: Final = {name: tuple(f"{name}_le_{bound}" for bound in _BOUNDS) for name in HISTOGRAMS}
_SUM_EVENTS: Final = {name: name + _SUM for name in HISTOGRAMS}


class Observer(Protocol):
    """What :func:`observe` counts with: a :class:`~celery_dlock.lock.counters.Tally` (``Redlock.tally``)."""

    def add_later(self, label: str, counts: tuple[tuple[str, int], ...]) -> None:
        """Add each ``(event, amount)`` to the counter ``<label>:<event>`` at the next flush."""
        ...


def observe(counters: Observer, task: str, name: str, seconds: float) -> None:
    """Add one observation of ``seconds`` (at least 0) to the histogram ``name`` (of :data:`HISTOGRAMS`) of ``task``.

    Its two counts (bucket and sum) go in one :meth:`~Observer.add_later`,
    with no lock taken: this runs twice per task when ``dlock_metrics`` is on.
    """
    seconds = max(seconds, 0.0)
    bucket = _BUCKET_EVENTS[name][bisect.bisect_left(BUCKETS, seconds)]
    counters.add_later(task, ((bucket, 1), (_SUM_EVENTS[name], round(seconds * 1e6))))


def is_histogram_event(event: str) -> bool:
    """Whether a counter event is part of a histogram rather than a plain count."""
    return event.startswith(HISTOGRAMS) and (event.endswith(_SUM) or "_le_" in event)


@dataclass(frozen=True)
class Histogram:
    """One task's histogram as Prometheus wants it: cumulative buckets, a sum and a count."""

    #: ``(upper bound, observations at or below it)``, the last bound ``+Inf``.
    buckets: list[tuple[str, int]]
    #: The sum of the observations, in seconds.
    total: float

    @property
    def count(self) -> int:
        """How many observations there were."""
        return self.buckets[-1][1]


def histograms(counts: Mapping[str, int], name: str) -> Histogram | None:
    """The histogram ``name`` from one task's counters (event to count), or ``None`` if it has none."""
    per_bucket = [counts.get(f"{name}_le_{bound}", 0) for bound in _BOUNDS]
    if not any(per_bucket):
        return None
    cumulative, running = [], 0
    for bound, amount in zip(_BOUNDS, per_bucket, strict=True):
        running += amount
        cumulative.append((bound, running))
    return Histogram(cumulative, counts.get(name + _SUM, 0) / 1_000_000)
