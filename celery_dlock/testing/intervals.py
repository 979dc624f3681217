"""Judging recorded runs: whether two runs of one key overlapped, whether their tokens rose.

A run is anything with a ``key``, a fencing ``token`` (``None`` when it held
no lock) and ``start``/``end`` times on one clock, such as the
:class:`~celery_dlock.testing.plugin.Run` records of ``dlock_runs``.
``time.monotonic_ns()`` is one clock for every process of a machine, so runs
recorded by different processes compare exactly.  These functions are the
one overlap checker of the testing helpers: :class:`~celery_dlock.testing.plugin.RunRecorder`
asserts with them, and a test suite that records runs its own way can too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

__all__ = ["Interval", "by_key", "falling_tokens", "most_at_once", "overlaps"]


class Interval(Protocol):
    """One recorded run: its lock key and token, and when it started and ended."""

    @property
    def key(self) -> str:
        """The lock key it ran under."""

    @property
    def token(self) -> int | None:
        """The fencing token of the lock it held, ``None`` if it held none."""

    @property
    def start(self) -> int:
        """When it started (nanoseconds, say)."""

    @property
    def end(self) -> int:
        """When it ended, on the clock of :attr:`start`."""


R = TypeVar("R", bound=Interval)


def by_key(intervals: Iterable[R]) -> dict[str, list[R]]:
    """The intervals grouped by key, each group in start order (ties kept as given)."""
    groups: dict[str, list[R]] = {}
    for interval in intervals:
        groups.setdefault(interval.key, []).append(interval)
    for group in groups.values():
        group.sort(key=lambda interval: interval.start)
    return groups


def overlaps(intervals: Iterable[R]) -> list[tuple[R, R]]:
    """``(earlier, later)`` pairs of one key where ``later`` started before ``earlier`` ended.

    Each interval is compared with the one that, of all intervals of its key
    that started before it, ends last: a short run nested in a long one is
    found even when another run started in between.  Every interval that
    overlaps anything earlier appears once, as ``later``.
    """
    found = []
    for group in by_key(intervals).values():
        latest: R | None = None
        for interval in group:
            if latest is not None and interval.start < latest.end:
                found.append((latest, interval))
            if latest is None or interval.end > latest.end:
                latest = interval
    return found


def most_at_once(intervals: Iterable[R]) -> dict[str, int]:
    """For each key, the most intervals that were open at one instant: at most ``limit`` for a semaphore.

    An interval that ends exactly when another starts does not count as
    open at once with it.
    """
    most = {}
    for key, group in by_key(intervals).items():
        # Ends sort before starts at the same instant: (time, 0) for an end.
        edges = sorted([(i.start, 1) for i in group] + [(i.end, 0) for i in group])
        open_now = peak = 0
        for _, starts in edges:
            open_now += 1 if starts else -1
            peak = max(peak, open_now)
        most[key] = peak
    return most


def falling_tokens(intervals: Iterable[R]) -> list[tuple[R | None, R]]:
    """``(earlier, later)`` pairs of one key where ``later``'s token is not higher.

    In start order, each token must be higher than the one before it on the
    same key, and the first one higher than 0 (lock tokens start at 1);
    ``earlier`` is ``None`` for a first token that is not.  Intervals without
    a token (runs that held no lock) are left out.
    """
    found: list[tuple[R | None, R]] = []
    for group in by_key(intervals).values():
        previous: R | None = None
        for interval in group:
            if interval.token is None:
                continue
            floor = previous.token if previous is not None and previous.token is not None else 0
            if interval.token <= floor:
                found.append((previous, interval))
            previous = interval
    return found
