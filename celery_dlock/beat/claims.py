"""Claiming each due run before publishing it, over any ``celery beat`` scheduler.

:class:`MultiBeatMixin` goes in front of a :class:`celery.beat.Scheduler`
subclass and replaces how it decides that an entry is due: by the entry's
slot (:mod:`.slots`), claimed as a non-blocking lock that expires after the
slot, so that of several beats only the claimer publishes.  Where the
scheduler keeps its entries (a shelve file, a database, Redis) stays its own
business, reached through two hooks, :meth:`~MultiBeatMixin.record_slot` and
:meth:`~MultiBeatMixin.after_publish`.  The design is in ``docs/beat.md``.
"""

from __future__ import annotations

import heapq
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from celery.beat import ScheduleEntry, event_t
from celery.schedules import crontab, schedstate
from celery.utils.log import get_logger
from celery.utils.time import maybe_make_aware
from kombu.utils.url import maybe_sanitize_url

from ..celery import compat
from ..celery.app_state import AppLocks, locks_for
from ..celery.headers import BEAT_ENTRY_HEADER, BEAT_SLOT_HEADER
from ..lock.errors import DLockError, LockBusy
from .slots import CLAIM_PREFIX, Slot, locate, utc

__all__ = ["ENTRY_HEADER", "RETRY_INTERVAL", "SLOT_HEADER", "STALL_ALLOWANCE", "MultiBeatMixin", "Outcome"]

logger = get_logger(__name__)

#: Message header naming the entry that published a run.
ENTRY_HEADER: Final = BEAT_ENTRY_HEADER
#: Message header carrying the slot (its instant, UTC ISO 8601) of a run;
#: ``single_flight(hold=period)`` reads it to place the run in its period.
SLOT_HEADER: Final = BEAT_SLOT_HEADER

#: Added to every claim's lease: a beat's stall between clock and claim.
STALL_ALLOWANCE: Final = 2.0
#: Seconds between claims retried while the lock service is unreachable.
RETRY_INTERVAL: Final = 1.0

#: ``last_run_at`` of an entry that never ran (redbeat leaves it unset).
_NEVER: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class Outcome:
    """What became of one due slot, from ``is_due`` to ``apply_entry``."""

    slot: Slot
    #: The tz of the entry's clock, for its ``last_run_at``.
    tz: Any
    #: ``won``: publish; ``taken``: another beat has it; ``stale``: past
    #: ``beat_cron_starting_deadline``.
    state: str
    holder: dict[str, Any] | None = None

    @property
    def last_run_at(self) -> datetime:
        """The slot's instant in the entry's time zone: its ``last_run_at`` once handled."""
        instant: datetime = self.slot.due.astimezone(self.tz)
        return instant


class _Go:
    """Stands in for an entry's schedule while the entry's own ``is_due`` runs.

    An entry's ``is_due`` applies its scheduler's own rules (disabled,
    ``start_time`` not reached, expired, a one-off that has run) and then asks
    its schedule; this schedule answers "due", so an answer that is not this
    one came from those rules.
    """

    tz = timezone.utc
    answer: Final = schedstate(True, 0.0)

    def is_due(self, last_run_at: datetime) -> schedstate:
        return self.answer

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


_GO: Final = _Go()


class MultiBeatMixin:
    """Put in front of a ``celery.beat.Scheduler`` subclass: claim each due run before publishing it.

    ``class Beat(MultiBeatMixin, SomeScheduler)`` is due by slots, claims
    each slot in Redis, publishes only what it claimed, and records every
    slot it handled, claimed here or not, through :meth:`record_slot`.  Settings,
    besides the ``dlock_*`` settings that reach the lock core
    (``dlock_redis_url``, ``dlock_key_prefix``, ``dlock_socket_timeout``):

    ``dlock_beat_max_skew``
        The largest clock difference between beats, in seconds, that never
        publishes a run twice (default 60).

    :func:`celery_dlock.beat.claiming_scheduler` builds the class for
    django-celery-beat's and redbeat's schedulers, with what each needs.
    """

    app: Any
    max_interval: float
    schedule: dict[str, ScheduleEntry]

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        self._locks: AppLocks = locks_for(app)
        #: The clock difference between beats that is tolerated, in seconds.
        self.max_skew = self._locks.settings.beat_max_skew
        self._outcomes: dict[str, Outcome] = {}
        self._unsent: dict[str, Slot] = {}
        # The latest slot handled per entry, for schedulers that reload their
        # entries from storage another beat may not have updated yet.
        self._handled: dict[str, datetime] = {}
        super().__init__(app, *args, **kwargs)  # type: ignore[call-arg]

    # -- setup and teardown ------------------------------------------------------

    def setup_schedule(self) -> None:
        """Set the schedule up as the scheduler does, then check every entry's schedule."""
        super().setup_schedule()  # type: ignore[misc]
        self.check_schedule()
        logger.info("beat: %sclaims on %s, max clock skew %gs", self.setup_note(), self.nodes(), self.max_skew)

    def check_schedule(self) -> None:
        """Refuse a schedule that cannot be placed in slots (a ``ConfigurationError``)."""
        for entry in self.schedule.values():
            locate(entry.schedule, entry.default_now(), self.last_handled(entry))

    def setup_note(self) -> str:
        """What the start-up log line says before the claims, ending in ``"; "``."""
        return f"{type(self).__name__}; "

    def close(self) -> None:
        """Close as the scheduler does, then the connections to the lock nodes."""
        try:
            super().close()  # type: ignore[misc]
        finally:
            self._locks.redlock.close()

    # -- when entries are due ---------------------------------------------------------

    def last_handled(self, entry: ScheduleEntry) -> datetime:
        """The instant of the last slot of ``entry`` this beat knows was handled."""
        last: datetime = entry.last_run_at or _NEVER
        seen = self._handled.get(entry.name)
        return last if seen is None or utc(last) >= seen else seen

    def locate(self, entry: ScheduleEntry, now: datetime | None = None) -> tuple[Slot | None, float]:
        """The slot of ``entry`` due now, if any, and the seconds to the next one."""
        now = entry.default_now() if now is None else now
        due, upcoming = locate(entry.schedule, now, self.last_handled(entry))
        wait = max(0.0, (upcoming - utc(now)).total_seconds())
        if due is None:
            return None, wait
        return Slot(entry.name, due, upcoming), wait

    def populate_heap(self, event_t: Any = event_t, heapify: Callable[[list[Any]], None] = heapq.heapify) -> None:
        """Order the entries by their slots, not by Celery's interval arithmetic."""
        heap = []
        for entry in self.schedule.values():
            try:
                slot, wait = self.locate(entry)
                delay = 0.0 if slot is not None else wait
            except Exception:
                delay = compat.failed_entry_delay(self, entry)
            heap.append(event_t(compat.heap_time(self, entry, delay) or 0, 5, entry))
        heapify(heap)
        compat.set_heap(self, heap)

    def is_due(self, entry: ScheduleEntry) -> schedstate:
        """Whether this beat handles a run of ``entry`` now: claim its slot first.

        Due (claimed here, or by another beat) or not due; while the lock
        service is down the entry stays not due and is checked again soon.
        An entry its scheduler holds back (disabled, before its start time)
        is not due, and is not claimed.
        """
        self._outcomes.pop(entry.name, None)
        now = entry.default_now()
        slot, wait = self.locate(entry, now)
        self._report_unsent(entry.name, slot)
        if slot is None:
            return schedstate(False, wait)
        held_back = self._held_back(entry)
        if held_back is not None:
            return held_back
        tz = maybe_make_aware(now).tzinfo
        deadline = self.app.conf.beat_cron_starting_deadline
        if (
            deadline is not None
            and isinstance(entry.schedule, crontab)
            and (utc(now) - slot.due).total_seconds() > deadline
        ):
            self._outcomes[entry.name] = Outcome(slot, tz, "stale")
            return schedstate(True, wait)
        lease = max(0.0, (slot.ends - utc(now)).total_seconds()) + self.max_skew + STALL_ALLOWANCE
        try:
            self._locks.redlock.acquire(slot.key, lease, blocking=False, label=self.label())
        except LockBusy as busy:
            self._outcomes[entry.name] = Outcome(slot, tz, "taken", busy.holder)
        except DLockError as exc:
            if self._unsent.get(entry.name) != slot:
                logger.error(
                    "beat: not sending %s for %s: cannot claim it (%s); trying again while the slot lasts",
                    entry.name, slot.id, exc,
                )  # fmt: skip
            self._unsent[entry.name] = slot
            return schedstate(False, min(RETRY_INTERVAL, self.max_interval, wait) or RETRY_INTERVAL)
        else:
            self._outcomes[entry.name] = Outcome(slot, tz, "won")
        self._unsent.pop(entry.name, None)
        return schedstate(True, wait)

    def _held_back(self, entry: ScheduleEntry) -> schedstate | None:
        """The entry's own answer if its scheduler's rules hold it back, else ``None``."""
        schedule = entry.schedule
        entry.schedule = _GO
        try:
            answer = entry.is_due()
        finally:
            entry.schedule = schedule
        return None if answer is _Go.answer else schedstate(*answer)

    def _report_unsent(self, name: str, slot: Slot | None) -> None:
        lost = self._unsent.get(name)
        if lost is not None and (slot is None or slot != lost):
            del self._unsent[name]
            logger.error("beat: %s for %s was not sent: the lock service stayed unreachable", name, lost.id)

    # -- after a slot was handled -------------------------------------------------------

    def reserve(self, entry: ScheduleEntry) -> ScheduleEntry:
        """Record the slot handled: ``last_run_at`` becomes its instant (see :meth:`record_slot`)."""
        outcome = self._outcomes.get(entry.name)
        if outcome is None:
            return super().reserve(entry)  # type: ignore[misc]
        self._handled[entry.name] = outcome.slot.due
        return self.record_slot(entry, outcome)

    def record_slot(self, entry: ScheduleEntry, outcome: Outcome) -> ScheduleEntry:
        """The entry as it is once ``outcome``'s slot is handled; kept in :attr:`schedule`.

        Called for every slot handled, whichever beat published it.  The
        default suits entries kept in memory: Celery's own and
        :class:`~celery_dlock.beat.MultiBeatScheduler`'s.
        """
        new_entry = compat.next_entry(entry, outcome.last_run_at)
        self.schedule[entry.name] = new_entry
        return new_entry

    def after_publish(self, entry: ScheduleEntry, slot: Slot) -> None:
        """Called once the broker took the run of ``slot``, on the beat that claimed it; does nothing."""

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        """Publish a run this beat claimed; note one another beat claimed."""
        outcome = self._outcomes.pop(entry.name, None)
        if outcome is None:
            # Only is_due() makes entries due, so this is not expected; never
            # publish without a claim.
            logger.error("beat: %s is due without a claim; not sending it", entry.name)
            return
        slot = outcome.slot
        if outcome.state == "taken":
            logger.info("Scheduler: %s for %s already claimed by %s", entry.name, slot.id, _who(outcome.holder))
            return
        if outcome.state == "stale":
            logger.warning("Scheduler: %s for %s is past beat_cron_starting_deadline; skipped", entry.name, slot.id)
            return
        logger.info("Scheduler: Sending due task %s (%s) for %s", entry.name, entry.task, slot.id)
        try:
            result = self.apply_async(_stamped(entry, slot), producer=producer, advance=False)  # type: ignore[attr-defined]
        except Exception as exc:
            # The claim stays: at most once, as with Celery's own beat.
            logger.error("Message Error: %s for %s was not sent: %s", entry.name, slot.id, exc, exc_info=True)
        else:
            logger.debug("%s sent for %s. id->%s", entry.task, slot.id, getattr(result, "id", None))
            self.after_publish(entry, slot)

    # -- reporting ----------------------------------------------------------------------

    @property
    def info(self) -> str:
        """What ``celery beat`` prints under its configuration."""
        return f"    . claims -> {self.nodes()} (max clock skew {self.max_skew:g}s)"

    def nodes(self) -> str:
        """The lock nodes, and the key a claim takes there."""
        settings = self._locks.settings
        urls = ", ".join(str(maybe_sanitize_url(url)) for url in settings.redis_url)
        return f"{urls} as {self._locks.redlock.keyspace.lock(CLAIM_PREFIX + '<entry>:<slot>')}"

    def label(self) -> str:
        """The claims' metadata label: who claimed."""
        return f"celery beat {socket.gethostname()} pid {os.getpid()} ({type(self).__name__})"


def _stamped(entry: ScheduleEntry, slot: Slot) -> ScheduleEntry:
    """A shallow copy of ``entry`` whose message carries the slot headers."""
    options = dict(entry.options or {})
    headers = dict(options.get("headers") or {})
    headers[ENTRY_HEADER] = entry.name
    headers[SLOT_HEADER] = slot.id
    options["headers"] = headers
    # Not the entry's constructor: a django-celery-beat entry is built from a
    # database row, and a copy through __reduce__ drops the app.
    stamped: ScheduleEntry = object.__new__(type(entry))
    vars(stamped).update(vars(entry))
    stamped.options = options
    return stamped


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another beat"
    return f"{holder.get('hostname', '?')} pid {holder.get('pid', '?')}"
