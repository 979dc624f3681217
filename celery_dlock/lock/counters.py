"""Event counters kept in the process and written to Redis in batches.

A :class:`Tally` adds up events (``acquired``, ``busy``, ``released``...) by
label in memory, so that counting costs a task no Redis command: the counts
are written as one script call per flush, at most ``flush_every`` seconds
after they happened.  The counters hash is then the only node-wide key a
lock script would have touched, which lets every lock script stay within its
key's hash slot on a Redis Cluster (``docs/architecture.md``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from .keyspace import Keyspace

__all__ = ["Tally", "parse_counts"]

#: The tallies of this process, emptied in a forked child: the parent flushes its own counts.
_TALLIES: weakref.WeakSet[Tally] = weakref.WeakSet()


class Tally:
    """Counts of ``(label, event)`` waiting to be written by ``flush``.

    ``flush`` is given the pending counts and writes them; it is called from
    :meth:`add` once ``flush_every`` seconds have passed since the last
    write, and by ``schedule`` (the watchdog's timer) for counts that would
    otherwise wait for the next event.  Counts whose write failed are lost,
    not retried: counters are for operators, never for locking.
    """

    def __init__(
        self,
        flush: Callable[[Mapping[tuple[str, str], int]], object],
        *,
        flush_every: float,
        schedule: Callable[[float, Callable[[], None]], None],
    ) -> None:
        self.flush_every = flush_every
        self._flush = flush
        self._schedule = schedule
        self._pending: Counter[tuple[str, str]] = Counter()
        self._mutex = threading.Lock()
        self._flushed_at = time.monotonic()
        self._scheduled = False
        self._later: deque[tuple[str, tuple[tuple[str, int], ...]]] = deque()
        _TALLIES.add(self)

    def add(self, label: str, event: str, amount: int = 1) -> None:
        """Count ``amount`` more of ``event`` under ``label``."""
        with self._mutex:
            self._pending[label, event] += amount
            due = time.monotonic() - self._flushed_at >= self.flush_every
            first = not self._scheduled
            self._scheduled = True
        if due:
            self.flush()
        elif first:
            self._schedule(self.flush_every, self.flush)

    def add_later(self, label: str, counts: tuple[tuple[str, int], ...]) -> None:
        """Count each ``(event, amount)`` of ``counts`` under ``label``, folded in at the next flush.

        For the hot path of a run's metrics (two per run): no mutex and no
        clock, only an append to a deque, which threads may share.  The flush
        is scheduled as :meth:`add` does it; a flush never loses an append,
        since it drains the deque after it has cleared ``_scheduled``.
        """
        self._later.append((label, counts))
        if not self._scheduled:
            with self._mutex:
                first = not self._scheduled
                self._scheduled = True
            if first:
                self._schedule(self.flush_every, self.flush)

    def pending(self) -> dict[tuple[str, str], int]:
        """The counts not yet written."""
        with self._mutex:
            found = Counter(self._pending)
        for label, more in list(self._later):
            for event, amount in more:
                found[label, event] += amount
        return dict(found)

    def flush(self) -> None:
        """Write the pending counts now, if there are any."""
        with self._mutex:
            counts, self._pending = self._pending, Counter()
            self._flushed_at = time.monotonic()
            self._scheduled = False
        later = self._later
        while later:
            label, more = later.popleft()
            for event, amount in more:
                counts[label, event] += amount
        if counts:
            self._flush(counts)

    def discard_pending(self) -> None:
        """Drop the counts not yet written: a forked child's copy of its parent's."""
        self._pending = Counter()
        self._later = deque()
        self._mutex = threading.Lock()
        self._scheduled = False


def parse_counts(space: Keyspace, reply: Any) -> dict[str, dict[str, int]]:
    """The counters of a stats hash's HGETALL ``reply``, by label and event."""
    counters: dict[str, dict[str, int]] = {}
    for field, value in zip(reply[::2], reply[1::2], strict=True):
        label, event = space.split_stats_field(field)
        counters.setdefault(label, {})[event] = int(value)
    return counters


def _forget_after_fork() -> None:
    for tally in list(_TALLIES):
        tally.discard_pending()


os.register_at_fork(after_in_child=_forget_after_fork)
