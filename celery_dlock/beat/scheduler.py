"""A ``celery beat`` scheduler that is safe to run on several hosts at once.

Set ``beat_scheduler = "celery_dlock.beat:MultiBeatScheduler"`` and run as
many beats as you like: all are active, with no leader and no fail-over gap.
Before publishing a due run, a beat claims its slot (:mod:`.slots`) with a
non-blocking lock that expires after the slot; only the claimer publishes.
The claiming is :class:`~.claims.MultiBeatMixin`'s; this module adds what is
particular to Celery's persistent scheduler: a schedule file per beat.  The
design, bookkeeping and clock-skew bound are in ``docs/beat.md``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any, Final

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import BaseSchedule
from celery.utils.log import get_logger

from ..celery import compat
from ..lock.errors import ConfigurationError
from .claims import ENTRY_HEADER, RETRY_INTERVAL, SLOT_HEADER, STALL_ALLOWANCE, MultiBeatMixin

try:
    import fcntl

    _flock: Callable[[int, int], None] | None = fcntl.flock
except ImportError:  # pragma: no cover - not POSIX
    _flock = None

__all__ = ["ENTRY_HEADER", "MAX_INSTANCES", "RETRY_INTERVAL", "SLOT_HEADER", "STALL_ALLOWANCE", "MultiBeatScheduler"]

logger = get_logger(__name__)

#: How many ``<base>-<n>`` files one host may have.
MAX_INSTANCES: Final = 1000


class MultiBeatScheduler(MultiBeatMixin, PersistentScheduler):  # type: ignore[misc]
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
        self._instance_fd: int | None = None
        self._attached: Any = None
        super().__init__(app, *args, **kwargs)

    # -- setup and teardown ------------------------------------------------------

    def setup_schedule(self) -> None:
        """Take this beat's own schedule file, open it, and check every entry's schedule."""
        self._take_instance_file()
        try:
            super().setup_schedule()
        except BaseException:
            self._free_instance_file()
            raise

    def setup_note(self) -> str:
        """The start-up log line names the schedule file."""
        return f"schedule file {self.schedule_filename}; "

    def close(self) -> None:
        """Save and close the schedule file, and give it up for the next beat."""
        try:
            super().close()
        finally:
            self._free_instance_file()

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

    # -- reporting ----------------------------------------------------------------------

    @property
    def info(self) -> str:
        """What ``celery beat`` prints under its configuration."""
        db = self.schedule_filename if self.instance is not None else f"{self.base_filename}-<n>"
        return f"    . db -> {db} (one per beat)\n{super().info}"

    def label(self) -> str:
        """The claims' metadata label names the schedule file."""
        return f"celery beat {socket.gethostname()} pid {os.getpid()} ({self.schedule_filename})"
