"""A lock held from an event loop: its key, owner, fencing token and lease, as its holder sees it.

:class:`AsyncLock` keeps the local state and leaves the I/O to the
:class:`~celery_dlock.aio.redlock.AsyncRedlock` that granted it.  Its
release is cancellation-safe: it runs in a task of its own that a cancelled
caller only stops waiting for, and the lock counts as released only once the
nodes have answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from ..lock.errors import DLockError, LockLost
from ..lock.validation import check_ttl
from .transport import background

__all__ = ["AsyncLeaseManager", "AsyncLock", "AsyncLostCallback"]

logger = logging.getLogger(__name__)

#: Called on the event loop when an auto-extended lock is lost.
AsyncLostCallback = Callable[["AsyncLock", DLockError], None]


class AsyncLeaseManager(Protocol):
    """What an :class:`AsyncLock` needs of the lock manager that granted it."""

    async def renew_lease(
        self, key: str, owner: str, ttl: float, *, token: int = 0, meta: str = "", limit: int = 1
    ) -> float:
        """Renew ``owner``'s lease on a quorum; when it stops being valid."""
        ...

    async def release_lease(self, key: str, owner: str, *, limit: int = 1) -> bool:
        """Delete the lock wherever ``owner`` holds it; True if a quorum confirmed."""
        ...

    def forget(self, lock: AsyncLock) -> None:
        """Stop auto-extending ``lock``."""
        ...


class AsyncLock:
    """A held lock: made by :meth:`AsyncRedlock.acquire`, released by ``await release()`` or ``async with``."""

    def __init__(
        self,
        manager: AsyncLeaseManager,
        key: str,
        owner: str,
        token: int,
        ttl: float,
        valid_until: float,
        *,
        label: str | None = None,
        on_lost: AsyncLostCallback | None = None,
        max_hold: float | None = None,
        meta: str = "",
        limit: int = 1,
    ) -> None:
        #: The key as the caller gave it, without the prefix.
        self.key = key
        #: The fencing token: strictly greater than every earlier holder's (sync or async).
        self.token = token
        #: The lease in seconds, renewed in full by each extension.
        self.ttl = ttl
        #: How many holders the key admits: 1 for a lock, more for a semaphore's permit.
        self.limit = limit
        #: The caller's label, stored in the metadata.
        self.label = label
        #: Called on the event loop if an auto-extended lock is lost.
        self.on_lost = on_lost
        #: Stop auto-extending once the lock has been held this many seconds.
        self.max_hold = max_hold
        #: How many times the lease has been extended.
        self.extensions = 0
        #: When the lock was acquired, on the monotonic clock.
        self.acquired_at = time.monotonic()
        self._manager = manager
        self._owner = owner
        self._meta = meta
        self._valid_until = valid_until
        self._lost = False
        self._released = False
        self._release: asyncio.Task[bool] | None = None
        self._turn = asyncio.Lock()  # renewals and the release, one at a time

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost else f"{self.remaining():.3f}s left"
        return f"<AsyncLock {self.key!r} token={self.token} {state}>"

    async def __aenter__(self) -> AsyncLock:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()

    @property
    def owner(self) -> str:
        """The random value that identifies this holder on every node."""
        return self._owner

    @property
    def released(self) -> bool:
        """Whether the nodes have answered a :meth:`release`."""
        return self._released

    @property
    def lost(self) -> bool:
        """True once the lease lapsed or an extension failed: stop writing, or fence writes with :attr:`token`."""
        return self._lost or (not self._released and time.monotonic() >= self._valid_until)

    @property
    def finished(self) -> bool:
        """Released (or releasing), or its loss recorded: nothing is left to renew."""
        return self._release is not None or self._lost

    def remaining(self) -> float:
        """Seconds of validity left, on the monotonic clock (0 once released)."""
        return 0.0 if self._released else max(0.0, self._valid_until - time.monotonic())

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` if the lock is lost; call before a write."""
        if self.lost:
            raise LockLost(f"lock {self.key!r} (token {self.token}) is lost", key=self.key)

    async def extend(self, ttl: float | None = None) -> None:
        """Renew the lease to ``ttl`` seconds (by default the original ttl); on failure it is marked :attr:`lost`."""
        try:
            await self.renew(ttl)
        except DLockError:
            self._lost = True
            raise

    async def renew(self, ttl: float | None = None) -> None:
        """Renew the lease without marking the lock lost on failure (the watchdog's call)."""
        ttl = self.ttl if ttl is None else check_ttl(ttl)
        async with self._turn:
            if self._release is not None:
                raise LockLost(f"lock {self.key!r} was released", key=self.key)
            if self.lost:
                raise LockLost(f"lock {self.key!r} lapsed before it was extended", key=self.key)
            valid_until = await self._manager.renew_lease(
                self.key, self._owner, ttl, token=self.token, meta=self._meta, limit=self.limit
            )
            self._valid_until = valid_until
            self.ttl = ttl
            self.extensions += 1

    async def release(self) -> bool:
        """Release the lock on every node where it is still ours; True if a quorum confirmed.

        Idempotent: a later call waits for the same release and returns False.
        Cancelling the caller does not stop the release, and it never raises
        for node errors, so it is safe in ``finally`` blocks.
        """
        first = self._release is None
        if self._release is None:
            self._manager.forget(self)
            self._release = background(self._end())
        released = await asyncio.shield(self._release)
        return released and first

    def report_lost(self, error: DLockError) -> None:
        """Record the loss, log it and tell ``on_lost``; called by the watchdog."""
        self._lost = True
        logger.warning("lock %r (token %s) lost: %s", self.key, self.token, error)
        if self.on_lost is not None:
            try:
                self.on_lost(self, error)
            except Exception:
                logger.exception("on_lost callback for lock %r raised", self.key)

    async def _end(self) -> bool:
        async with self._turn:
            lapsed = not self._lost and time.monotonic() >= self._valid_until
            released = await self._manager.release_lease(self.key, self._owner, limit=self.limit)
            self._released = True
        if lapsed:
            self.report_lost(
                LockLost(f"lock {self.key!r} (token {self.token}) lapsed before its release", key=self.key)
            )
        return released
