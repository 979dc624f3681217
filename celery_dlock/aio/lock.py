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
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from ..lock.errors import DLockError, LockLost
from ..lock.lease_state import LeaseState
from ..lock.validation import check_ttl
from .transport import background

__all__ = ["AsyncLeaseManager", "AsyncLock", "AsyncLostCallback", "Holding"]

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


@dataclass(frozen=True)
class Holding:
    """How an acquirer asked to hold its lock: the options of :meth:`AsyncRedlock.acquire` that outlive it."""

    #: The caller's label, stored in the metadata.
    label: str | None = None
    #: Called on the event loop if an auto-extended lock is lost.
    on_lost: AsyncLostCallback | None = None
    #: Stop auto-extending once the lock has been held this many seconds.
    max_hold: float | None = None
    #: The holder metadata stored with the lock (JSON), put back on nodes that lost it.
    meta: str = ""
    #: How many holders the key admits: 1 for a lock, more for a semaphore's permit.
    limit: int = 1


class AsyncLock(LeaseState):
    """A held lock: made by :meth:`AsyncRedlock.acquire`, released by ``await release()`` or ``async with``.

    Attributes:
        key: The key as the caller gave it, without the prefix.
        token: The fencing token: strictly greater than every earlier holder's, sync or async.
        ttl: The lease in seconds, renewed in full by each extension.
        label, on_lost, max_hold, limit: As given to :meth:`AsyncRedlock.acquire` (see :class:`Holding`).
        extensions: How many times the lease has been extended.
        acquired_at: When the lock was acquired, on the monotonic clock.

    """

    def __init__(
        self, manager: AsyncLeaseManager, key: str, owner: str, ttl: float, grant: tuple[int, float], holding: Holding
    ) -> None:
        self.key, self.ttl, self.acquired_at, self.extensions = key, ttl, time.monotonic(), 0
        self.token, self._valid_until = grant
        self.label, self.on_lost, self.max_hold, self.limit = (
            holding.label,
            holding.on_lost,
            holding.max_hold,
            holding.limit,
        )
        self._manager, self._owner, self._meta = manager, owner, holding.meta
        self._lost = self._released = False
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
    def finished(self) -> bool:
        """Released (or releasing), or its loss recorded: nothing is left to renew."""
        return self._release is not None or self._lost

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
