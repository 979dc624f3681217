"""A ``celery beat`` scheduler that is safe to run on several hosts at once.

Set ``beat_scheduler = "celery_dlock.beat:MultiBeatScheduler"`` and run as
many beats as you like: all are active, with no leader and no fail-over gap.
Before publishing a due run, a beat claims its slot (:mod:`.slots`) with a
non-blocking lock that expires after the slot; only the claimer publishes.
The design, bookkeeping and clock-skew bound are in ``docs/beat.md``.
"""

from __future__ import annotations

import errno
import heapq
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from celery.beat import PersistentScheduler, ScheduleEntry, event_t
from celery.schedules import BaseSchedule, crontab, schedstate
from celery.utils.log import get_logger
from celery.utils.time import maybe_make_aware
from kombu.utils.url import maybe_sanitize_url

from ..celery import compat
from ..celery.app_state import AppLocks, locks_for
from ..celery.headers import BEAT_ENTRY_HEADER, BEAT_SLOT_HEADER
from ..lock.errors import ConfigurationError, DLockError, LockBusy
from .slots import CLAIM_PREFIX, Slot, locate, utc

try:
    import fcntl

    _flock: Callable[[int, int], None] | None = fcntl.flock
except ImportError:  # pragma: no cover - not POSIX
    _flock = None

__all__ = ["ENTRY_HEADER", "MAX_INSTANCES", "RETRY_INTERVAL", "SLOT_HEADER", "STALL_ALLOWANCE", "MultiBeatScheduler"]

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
#: How many ``<base>-<n>`` files one host may have.
MAX_INSTANCES: Final = 1000


# -- the scheduler ---------------------------------------------------------------------


@dataclass
class _Outcome:
    """What became of one due slot, from ``is_due`` to ``apply_entry``."""

    slot: Slot
    #: The tz of the entry's clock, for its ``last_run_at``.
    tz: Any
    #: ``won``: publish; ``taken``: another beat has it; ``stale``: past
    #: ``beat_cron_starting_deadline``.
    state: str
    holder: dict[str, Any] | None = None


class MultiBeatScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, claiming each run in Redis before publishing.

    The design is in ``docs/beat.md``.  Settings, besides the
    ``dlock_*`` settings that reach the lock core (``dlock_redis_url``,
    ``dlock_key_prefix``, ``dlock_socket_timeout``):

    ``dlock_beat_max_skew``
        The largest clock difference between beats, in seconds, that never
        publishes a run twice (default 60).
    """

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        #: The configured schedule file: a base name, see :attr:`instance`.
        self.base_filename: str = kwargs.get("schedule_filename") or app.conf.beat_schedule_filename
        #: This beat's number among the beats sharing ``base_filename`` on the host.
        self.instance: int | None = None
        #: The file this beat uses: ``<base_filename>-<instance>`` once set up.
        self.schedule_filename: str = self.base_filename
        #: The clock difference between beats that is tolerated, in seconds.
        self.max_skew = locks_for(app).settings.beat_max_skew
        self._locks: AppLocks = locks_for(app)
        self._instance_fd: int | None = None
        self._outcomes: dict[str, _Outcome] = {}
        self._unsent: dict[str, Slot] = {}
        self._attached: Any = None
        super().__init__(app, *args, **kwargs)

    # -- setup and teardown ------------------------------------------------------

    def setup_schedule(self) -> None:
        """Take this beat's own schedule file, open it, and check every entry's schedule."""
        self._take_instance_file()
        try:
            super().setup_schedule()
            for entry in self.schedule.values():
                locate(entry.schedule, entry.default_now(), entry.last_run_at)
        except BaseException:
            self._free_instance_file()
            raise
        logger.info(
            "beat: schedule file %s; claims on %s, max clock skew %gs",
            self.schedule_filename, self._nodes(), self.max_skew,
        )  # fmt: skip

    def close(self) -> None:
        """Save and close the schedule file, and give it up for the next beat."""
        try:
            super().close()
        finally:
            self._free_instance_file()
            self._locks.redlock.close()

    def _take_instance_file(self) -> None:
        if self._instance_fd is not None:
            return
        if _flock is None:  # pragma: no cover - not POSIX
            self.schedule_filename = f"{self.base_filename}-{socket.gethostname()}-{os.getpid()}"
            return
        for number in range(MAX_INSTANCES):
            path = f"{self.base_filename}-{number}"
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    continue
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            self._instance_fd, self.instance, self.schedule_filename = fd, number, path
            return
        raise ConfigurationError(
            f"celery_dlock.beat: {MAX_INSTANCES} beats already use {self.base_filename}-<n> on this host"
        )

    def _free_instance_file(self) -> None:
        fd, self._instance_fd = self._instance_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def get_schedule(self) -> dict[str, ScheduleEntry]:
        """The entries, tied to this scheduler's app.

        Entries come back from the shelve without their app (a sync empties
        its cache), which would leave their clocks and time zones to whatever
        app is current; give them ours again.
        """
        entries = compat.stored_entries(self)
        if entries is not self._attached:
            for entry in entries.values():
                if entry.app is None:
                    entry.app = self.app
                if isinstance(entry.schedule, BaseSchedule) and compat.schedule_app(entry.schedule) is None:
                    entry.schedule.app = self.app
            self._attached = entries
        return entries

    schedule = property(get_schedule, PersistentScheduler.set_schedule)

    # -- when entries are due ---------------------------------------------------------

    def locate(self, entry: ScheduleEntry, now: datetime | None = None) -> tuple[Slot | None, float]:
        """The slot of ``entry`` due now, if any, and the seconds to the next one."""
        now = entry.default_now() if now is None else now
        due, upcoming = locate(entry.schedule, now, entry.last_run_at)
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
        """
        self._outcomes.pop(entry.name, None)
        now = entry.default_now()
        slot, wait = self.locate(entry, now)
        self._report_unsent(entry.name, slot)
        if slot is None:
            return schedstate(False, wait)
        tz = maybe_make_aware(now).tzinfo
        deadline = self.app.conf.beat_cron_starting_deadline
        if (
            deadline is not None
            and isinstance(entry.schedule, crontab)
            and (utc(now) - slot.due).total_seconds() > deadline
        ):
            self._outcomes[entry.name] = _Outcome(slot, tz, "stale")
            return schedstate(True, wait)
        lease = max(0.0, (slot.ends - utc(now)).total_seconds()) + self.max_skew + STALL_ALLOWANCE
        try:
            self._locks.redlock.acquire(slot.key, lease, blocking=False, label=self._label())
        except LockBusy as busy:
            self._outcomes[entry.name] = _Outcome(slot, tz, "taken", busy.holder)
        except DLockError as exc:
            if self._unsent.get(entry.name) != slot:
                logger.error(
                    "beat: not sending %s for %s: cannot claim it (%s); trying again while the slot lasts",
                    entry.name, slot.id, exc,
                )  # fmt: skip
            self._unsent[entry.name] = slot
            return schedstate(False, min(RETRY_INTERVAL, self.max_interval, wait) or RETRY_INTERVAL)
        else:
            self._outcomes[entry.name] = _Outcome(slot, tz, "won")
        self._unsent.pop(entry.name, None)
        return schedstate(True, wait)

    def _report_unsent(self, name: str, slot: Slot | None) -> None:
        lost = self._unsent.get(name)
        if lost is not None and (slot is None or slot != lost):
            del self._unsent[name]
            logger.error("beat: %s for %s was not sent: the lock service stayed unreachable", name, lost.id)

    def reserve(self, entry: ScheduleEntry) -> ScheduleEntry:
        """Record the slot handled: ``last_run_at`` becomes its instant."""
        outcome = self._outcomes.get(entry.name)
        if outcome is None:
            return super().reserve(entry)
        new_entry = compat.next_entry(entry, outcome.slot.due.astimezone(outcome.tz))
        self.schedule[entry.name] = new_entry
        return new_entry

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
            result = self.apply_async(_stamped(entry, slot), producer=producer, advance=False)
        except Exception as exc:
            # The claim stays: at most once, as with Celery's own beat.
            logger.error("Message Error: %s for %s was not sent: %s", entry.name, slot.id, exc, exc_info=True)
        else:
            logger.debug("%s sent for %s. id->%s", entry.task, slot.id, getattr(result, "id", None))

    # -- reporting ----------------------------------------------------------------------

    @property
    def info(self) -> str:
        """What ``celery beat`` prints under its configuration."""
        db = self.schedule_filename if self.instance is not None else f"{self.base_filename}-<n>"
        return f"    . db -> {db} (one per beat)\n    . claims -> {self._nodes()} (max clock skew {self.max_skew:g}s)"

    def _nodes(self) -> str:
        settings = self._locks.settings
        urls = ", ".join(str(maybe_sanitize_url(url)) for url in settings.redis_url)
        return f"{urls} as {self._locks.redlock.keyspace.lock(CLAIM_PREFIX + '<entry>:<slot>')}"

    def _label(self) -> str:
        return f"celery beat {socket.gethostname()} pid {os.getpid()} ({self.schedule_filename})"


def _stamped(entry: ScheduleEntry, slot: Slot) -> ScheduleEntry:
    """A copy of ``entry`` whose message carries the slot headers."""
    options = dict(entry.options or {})
    headers = dict(options.get("headers") or {})
    headers[ENTRY_HEADER] = entry.name
    headers[SLOT_HEADER] = slot.id
    options["headers"] = headers
    return type(entry)(**dict(entry, options=options))


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another beat"
    return f"{holder.get('hostname', '?')} pid {holder.get('pid', '?')}"
