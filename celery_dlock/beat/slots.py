"""The slots of a schedule: which run of an entry is due, the same on every beat.

Every run of an entry belongs to a *slot*: the instant it is due at, and the
instant of the run after it.  Intervals are aligned to the Unix epoch, and
``crontab`` and ``solar`` entries use their own instants, so beats started at
different times agree on every slot.  The design is in ``docs/beat.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from celery.schedules import BaseSchedule, crontab
from celery.schedules import schedule as interval
from celery.utils.time import maybe_make_aware

from ..lock.errors import ConfigurationError

__all__ = ["CLAIM_PREFIX", "Slot", "locate", "utc"]

#: Claims are the locks ``beat:<entry name>:<slot>``.
CLAIM_PREFIX: Final = "beat:"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND: Final = timedelta(microseconds=1)
_SECOND: Final = timedelta(seconds=1)
_HOUR: Final = timedelta(hours=1)


@dataclass(frozen=True)
class Slot:
    """One scheduled run of one entry: due at :attr:`due`, until :attr:`ends`."""

    #: The entry's name.
    entry: str
    #: The scheduled instant, in UTC.
    due: datetime
    #: The next scheduled instant, in UTC: the slot is current until then.
    ends: datetime

    @property
    def id(self) -> str:
        """The instant in UTC ISO 8601, with microseconds only if it has any."""
        text = self.due.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        if self.due.microsecond:
            text += f".{self.due.microsecond:06d}"
        return text + "Z"

    @property
    def key(self) -> str:
        """The lock key that claims this slot."""
        return f"{CLAIM_PREFIX}{self.entry}:{self.id}"


def locate(sched: Any, now: datetime, last_run_at: datetime) -> tuple[datetime | None, datetime]:
    """Where ``now`` falls in ``sched``, for an entry last run at ``last_run_at``.

    Returns ``(due, upcoming)``, both in UTC: ``due`` is the latest instant
    of the schedule in ``(last_run_at, now]``, or ``None`` if there is none
    (the entry is not due), and ``upcoming`` is the first instant after
    ``now`` (after ``due`` once that has run).  Raises
    :class:`~celery_dlock.lock.errors.ConfigurationError` for a schedule it cannot
    place in slots.
    """
    now = utc(now)
    last_run_at = utc(last_run_at)
    if isinstance(sched, interval):
        return _locate_interval(sched, now, last_run_at)
    if isinstance(sched, BaseSchedule) and callable(getattr(sched, "remaining_estimate", None)):
        return _locate_instants(sched, now, last_run_at)
    raise ConfigurationError(
        f"celery_dlock.beat: cannot find the slots of schedule {sched!r}; intervals, crontab, "
        "solar and BaseSchedule subclasses with remaining_estimate() are supported"
    )


def _locate_interval(sched: interval, now: datetime, last_run_at: datetime) -> tuple[datetime | None, datetime]:
    period = sched.run_every // _MICROSECOND
    if period <= 0:
        raise ConfigurationError(f"celery_dlock.beat: the interval {sched.run_every} is not positive")
    current = _micros(now) // period
    handled = _micros(last_run_at) // period
    if current > handled:
        return _from_micros(current * period), _from_micros((current + 1) * period)
    # Not due; if last_run_at is ahead of now (a clock that went back), wait for it.
    return None, _from_micros((handled + 1) * period)


def _locate_instants(sched: BaseSchedule, now: datetime, last_run_at: datetime) -> tuple[datetime | None, datetime]:
    first = _next_instant(sched, last_run_at)
    if first <= last_run_at:
        # No instant after the last run: a one-time schedule (such as
        # django-celery-beat's clocked) that has run.  Look again in an hour.
        return None, now + _HOUR
    if first > now:
        return None, first
    second = _next_instant(sched, first)
    if second > now:
        due = first
    else:
        # Several instants were missed: find the latest one by bisection,
        # keeping next(lo) <= now < next(hi).
        lo, hi = first, now
        while hi - lo > _SECOND:
            mid = lo + (hi - lo) / 2
            if _next_instant(sched, mid) <= now:
                lo = mid
            else:
                hi = mid
        due = _next_instant(sched, lo)
    if not isinstance(sched, crontab):
        due = _canonical(sched, due)
    return due, _next_instant(sched, due)


def _next_instant(sched: BaseSchedule, after: datetime) -> datetime:
    """The first instant of ``sched`` strictly after ``after``, in UTC."""
    found = _raw_next(sched, after)
    if not isinstance(sched, crontab) and found - after < _SECOND:
        # A solar event computed from a start a hair before it can come out
        # as itself again: look past it.
        found = _raw_next(sched, after + _SECOND)
    return found


def _raw_next(sched: BaseSchedule, after: datetime) -> datetime:
    # remaining_estimate(t) is "next instant after t, minus now": freeze the
    # schedule's clock at t to read the instant itself.  The beat is single
    # threaded, so swapping nowfun for the call is safe.
    saved = sched.nowfun
    sched.nowfun = lambda: after
    try:
        remaining: timedelta = sched.remaining_estimate(after)
    finally:
        sched.nowfun = saved
    return after + remaining


def _canonical(sched: BaseSchedule, due: datetime) -> datetime:
    """``due`` computed again from a fixed point before it, to the second.

    An astronomical result differs in its last digits with the starting point
    of the search; started from the hour before, every beat gets the same one.
    """
    anchor = due.replace(minute=0, second=0, microsecond=0) - _HOUR
    again = _next_instant(sched, anchor)
    if abs(again - due) < _SECOND:
        due = again
    return _from_micros(round(_micros(due) / 1_000_000) * 1_000_000)


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware datetime in UTC (a naive one is taken in the app's time zone)."""
    aware: datetime = maybe_make_aware(moment)
    return aware.astimezone(timezone.utc)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)
