"""A held lock: its key, owner, fencing token and lease, as its holder sees it.

:class:`Lock` keeps the local state (how long the lease is valid, whether it
was released or lost) and leaves the I/O to the :class:`LeaseManager` that
granted it, a :class:`~celery_dlock.lock.redlock.Redlock`.  It is what the
watchdog renews, through :class:`~celery_dlock.lock.watchdog.Renewable`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from .errors import DLockError, LockLost
from .faults import fault_point
from .validation import check_ttl
from .watchdog import Watchdog

__all__ = ["LeaseManager", "Lock", "LostCallback"]

logger = logging.getLogger(__name__)

#: Called from the watchdog thread when an auto-extended lock is lost.
LostCallback = Callable[["Lock", DLockError], None]


class LeaseManager(Protocol):
    """What a :class:`Lock` needs of the lock manager that granted it."""

    def renew_lease(self, key: str, owner: str, ttl: float, *, token: int = 0, meta: str = "", limit: int = 1) -> float:
        """Renew ``owner``'s lease on a quorum, repairing nodes that lost it; returns when it stops being valid."""
        ...

    def release_lease(self, key: str, owner: str, *, wait: bool = True, limit: int = 1) -> bool:
        """Delete the lock wherever ``owner`` holds it; True if a quorum confirmed."""
        ...

    def count(self, label: str, event: str, amount: int = 1) -> None:
        """Add to the counter ``<label>:<event>``."""
        ...


class Lock:
    """A held lock: its key, fencing token and lease.

    Made by :meth:`Redlock.acquire`; not constructed directly.  It is a
    context manager that releases on exit.  ``release()`` and ``extend()``
    check that the lock is still ours on each node, so they never touch a
    lock that has since passed to another owner.
    """

    def __init__(
        self,
        manager: LeaseManager,
        key: str,
        owner: str,
        token: int,
        ttl: float,
        valid_until: float,
        *,
        label: str | None = None,
        on_lost: LostCallback | None = None,
        max_hold: float | None = None,
        count_as: str | None = None,
        watchdog: Watchdog | None = None,
        meta: str = "",
        limit: int = 1,
    ) -> None:
        #: The key as the caller gave it, without the prefix.
        self.key = key
        #: The fencing token: strictly greater than every earlier holder's.
        self.token = token
        #: The lease in seconds, renewed in full by each extension.
        self.ttl = ttl
        #: How many holders the key admits: 1 for a lock, more for a semaphore's permit.
        self.limit = limit
        #: The caller's label (a Celery task id, say), stored in the metadata.
        self.label = label
        #: Called from the watchdog thread if an auto-extended lock is lost.
        self.on_lost = on_lost
        #: Stop auto-extending once the lock has been held this many seconds.
        self.max_hold = max_hold
        #: The label its events are counted under, if counted.
        self.count_as = count_as
        #: How many times the lease has been extended.
        self.extensions = 0
        #: When the lock was acquired, on the monotonic clock.
        self.acquired_at = time.monotonic()
        self._manager = manager
        self._owner = owner
        self._valid_until = valid_until
        self._released = False
        self._lost = False
        self._mutex = threading.Lock()
        self._watchdog = watchdog
        self._meta = meta

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost else f"{self.remaining():.3f}s left"
        return f"<Lock {self.key!r} token={self.token} {state}>"

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @property
    def owner(self) -> str:
        """The random value that identifies this holder on every node."""
        return self._owner

    @property
    def released(self) -> bool:
        """Whether :meth:`release` has been called."""
        return self._released

    @property
    def lost(self) -> bool:
        """True once the lease lapsed or an extension failed.

        A lost lock may already belong to someone else: stop writing, or fence
        writes with :attr:`token`.
        """
        if self._lost:
            return True
        return not self._released and time.monotonic() >= self._valid_until

    @property
    def finished(self) -> bool:
        """Released, or its loss recorded: nothing is left to renew."""
        return self._released or self._lost

    def remaining(self) -> float:
        """Seconds of validity left, on the monotonic clock (0 once released)."""
        if self._released:
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` if the lock is lost; call before a write."""
        if self.lost:
            raise LockLost(f"lock {self.key!r} (token {self.token}) is lost", key=self.key)

    def extend(self, ttl: float | None = None) -> None:
        """Renew the lease to ``ttl`` seconds (by default the original ttl).

        Raises :class:`LockLost` if the lock is no longer ours on a quorum, or
        :class:`LockUnavailable` if a quorum could not be reached; either way
        the lock is then marked :attr:`lost`.
        """
        try:
            self.renew(ttl)
        except DLockError:
            self._lost = True
            raise

    def renew(self, ttl: float | None = None) -> None:
        """Renew the lease without marking the lock lost on failure (the watchdog's call)."""
        with self._mutex:
            if self._released:
                raise LockLost(f"lock {self.key!r} was released", key=self.key)
            if self.lost:
                raise LockLost(f"lock {self.key!r} lapsed before it was extended", key=self.key)
            ttl = self.ttl if ttl is None else check_ttl(ttl)
            valid_until = self._manager.renew_lease(
                self.key, self._owner, ttl, token=self.token, meta=self._meta, limit=self.limit
            )
            fault_point("mid-extend")  # the nodes renewed; this process has not yet seen it
            self._valid_until = valid_until
            self.ttl = ttl
            self.extensions += 1

    def release(self) -> bool:
        """Release the lock on every node where it is still ours.

        Idempotent: later calls do nothing and return False.  Returns True
        when a quorum confirmed that the lock was still ours; False means it had
        been lost, or too few nodes answered (it then expires with its lease).
        It never raises for node errors, so it is safe in ``finally`` blocks.
        """
        return self._end(wait=True)

    def release_nowait(self) -> None:
        """Release the lock without waiting for the nodes to confirm.

        The release is sent to every node at once and its replies are read
        later, with the connection's next command, so it costs no round trip.
        For callers that would not act on :meth:`release`'s answer.
        """
        self._end(wait=False)

    unlock = release

    def keep(self, seconds: float) -> bool:
        """Keep the lock for ``seconds`` more, then let it expire on its own.

        Renewal stops and :meth:`release` becomes a no-op: for work that must
        not run again until a period is over, even though it has finished.
        Returns False, having released nothing, if the lock was already lost.
        """
        seconds = check_ttl(seconds, "seconds")
        with self._mutex:
            if self._released:
                return False
            self._released = True
            try:
                self._manager.renew_lease(
                    self.key, self._owner, seconds, token=self.token, meta=self._meta, limit=self.limit
                )
            except DLockError:
                self._lost = True
                return False
            return True

    def report_lost(self, error: DLockError) -> None:
        """Record the loss, log it and tell ``on_lost``; called by the watchdog."""
        self._lost = True
        logger.warning("lock %r (token %s) lost: %s", self.key, self.token, error)
        if self.on_lost is not None:
            try:
                self.on_lost(self, error)
            except Exception:
                logger.exception("on_lost callback for lock %r raised", self.key)

    def do_release(self, wait: bool) -> bool:
        """The I/O of a release, once the local state says it is due; subclasses may hand on."""
        return self._manager.release_lease(self.key, self._owner, wait=wait, limit=self.limit)

    def _end(self, *, wait: bool) -> bool:
        with self._mutex:
            if self._released:
                return False
            lapsed = not self._lost and time.monotonic() >= self._valid_until
            self._released = True
            if self._watchdog is not None:
                self._watchdog.forget(self)
            fault_point("before-release")
            released = self.do_release(wait)
        if self.count_as and (released or not wait):
            self._manager.count(self.count_as, "released")
        if lapsed:
            # Nothing renewed it in time (say, a body that never let the
            # watchdog thread run): the loss is reported now, at the latest.
            self.report_lost(
                LockLost(f"lock {self.key!r} (token {self.token}) lapsed before its release", key=self.key)
            )
        return released
