"""Auto-extension on an event loop: one task per loop renews every auto-extended lock of that loop.

:func:`loop_watchdog` is the running loop's :class:`LoopWatchdog`.  Its task
starts with the first lock it watches and ends when it watches none; it
sleeps until the next lock is due (once ``extend_every`` of its ttl has
passed), renews every due lock at once, and reports a lost lock through the
lock's ``on_lost`` and :attr:`~celery_dlock.aio.lock.AsyncLock.lost`.  When
nodes are merely unreachable it tries again while the lease is still valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Final

from ..lock.errors import DLockError, LockLost
from .lock import AsyncLock

__all__ = ["LoopWatchdog", "loop_watchdog"]

logger = logging.getLogger(__name__)

#: Shortest and longest pause before renewing again after a node error.
RETRY_PAUSE: Final = (0.05, 1.0)

_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatchdog] = weakref.WeakKeyDictionary()


def loop_watchdog() -> LoopWatchdog:
    """The running event loop's watchdog, made on first use."""
    loop = asyncio.get_running_loop()
    watchdog = _WATCHDOGS.get(loop)
    if watchdog is None:
        watchdog = _WATCHDOGS[loop] = LoopWatchdog()
    return watchdog


class LoopWatchdog:
    """The renewals of one event loop's auto-extended locks, in one task."""

    def __init__(self) -> None:
        #: Each watched lock, with the share of its ttl between renewals and when it is next due.
        self._due: dict[AsyncLock, tuple[float, float]] = {}
        self._wake = asyncio.Event()
        #: The renewal task while any lock is watched, else ``None``.
        self.task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """How many locks are watched."""
        return len(self._due)

    def watch(self, lock: AsyncLock, every: float) -> None:
        """Renew ``lock`` each time ``every`` of its ttl has passed, until it is released or lost."""
        self._due[lock] = (every, time.monotonic() + lock.ttl * every)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="celery-dlock-watchdog")
        self._wake.set()

    def forget(self, lock: AsyncLock) -> None:
        """Stop renewing ``lock``."""
        if self._due.pop(lock, None) is not None:
            self._wake.set()

    async def _run(self) -> None:
        while self._due:
            now = time.monotonic()
            due = [(lock, every) for lock, (every, at) in self._due.items() if at <= now]
            if due:
                await asyncio.gather(*(self._renew(lock, every) for lock, every in due))
                continue
            self._wake.clear()
            nearest = min(at for _, at in self._due.values())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), nearest - now)
        self.task = None

    async def _renew(self, lock: AsyncLock, every: float) -> None:
        held_for = time.monotonic() - lock.acquired_at
        if lock.max_hold is not None and held_for >= lock.max_hold:
            self._give_up(lock)
            return
        try:
            await lock.renew()
        except DLockError as exc:
            left = lock.remaining()
            if isinstance(exc, LockLost) or left <= 0:
                self._due.pop(lock, None)
                if not lock.finished:
                    lock.report_lost(exc)
                return
            logger.info("could not extend lock %r, %.3fs left: %s", lock.key, left, exc)
            pause = min(RETRY_PAUSE[1], max(RETRY_PAUSE[0], left / 4))
            self._reschedule(lock, every, time.monotonic() + pause)
            return
        self._reschedule(lock, every, time.monotonic() + lock.ttl * every)

    def _reschedule(self, lock: AsyncLock, every: float, at: float) -> None:
        if lock in self._due and not lock.finished:
            self._due[lock] = (every, at)

    def _give_up(self, lock: AsyncLock) -> None:
        """Past ``max_hold``: no more renewals; the loss is reported once the lease lapses."""
        left = lock.remaining()
        if left > 0:
            self._due[lock] = (0.0, time.monotonic() + left)
            return
        self._due.pop(lock, None)
        if not lock.finished:
            lock.report_lost(LockLost(f"lock {lock.key!r} was held past max_hold={lock.max_hold}s", key=lock.key))
