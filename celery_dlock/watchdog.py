"""One renewal thread per process for every auto-extended lock.

The watchdog renews each lock once a set share of its ttl has passed.  When a
renewal finds the lock gone it marks the lock lost and calls its ``on_lost``
callback; when nodes are merely unreachable it keeps trying while the lease
is still valid, and reports the loss once it is not.  Nothing it runs can kill
the thread: every error is logged and the loop goes on.

Locks are held by weak reference, so a lock that is dropped without being
released stops being renewed and expires with its lease.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .errors import DLockError, LockLost

if TYPE_CHECKING:
    from .redlock import Lock

__all__ = ["Watchdog", "default_watchdog"]

logger = logging.getLogger(__name__)

#: Shortest and longest pause between renewal attempts after a node error.
_RETRY_MIN = 0.05
_RETRY_MAX = 1.0


class Watchdog:
    """A daemon thread that keeps leases alive, started on first use."""

    def __init__(self, name: str = "celery-dlock-watchdog") -> None:
        self.name = name
        self._queue: list[tuple[float, int, weakref.ref[Lock], float]] = []
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sleeping_until = 0.0

    def __len__(self) -> int:
        """How many locks are being kept alive."""
        with self._wakeup:
            return sum(1 for _, _, ref, _ in self._queue if _alive(ref()))

    def watch(self, lock: Lock, every: float) -> None:
        """Renew ``lock`` each time ``every`` (a share of its ttl) has passed."""
        self._schedule(lock, time.monotonic() + lock.ttl * every, every)

    def _schedule(self, lock: Lock, due: float, every: float) -> None:
        with self._wakeup:
            heapq.heappush(self._queue, (due, next(self._order), weakref.ref(lock), every))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif due < self._sleeping_until:
                # Waking the thread costs a context switch: only when it
                # would otherwise sleep past the new lock's renewal.
                self._wakeup.notify()

    def _run(self) -> None:
        while True:
            try:
                lock, every = self._next_due()
                if lock is not None:
                    self._renew(lock, every)
            except Exception:  # the thread must outlive any bug in a renewal
                logger.exception("watchdog renewal failed unexpectedly")
            finally:
                lock = None  # drop the strong reference while we sleep

    def _next_due(self) -> tuple[Lock | None, float]:
        with self._wakeup:
            while True:
                if not self._queue:
                    self._sleeping_until = math.inf
                    self._wakeup.wait()
                    continue
                due, _, ref, every = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._sleeping_until = due
                    self._wakeup.wait(wait)
                    continue
                self._sleeping_until = 0.0
                heapq.heappop(self._queue)
                lock = ref()
                if _alive(lock):
                    return lock, every

    def _renew(self, lock: Lock, every: float) -> None:
        now = time.monotonic()
        if lock.max_hold is not None and now - lock.acquired_at >= lock.max_hold:
            self._expire(lock)
            return
        try:
            lock._extend(None)
        except LockLost as exc:
            lock._mark_lost(exc)
            return
        except DLockError as exc:
            left = lock.remaining()
            if left <= 0:
                lock._mark_lost(exc)
                return
            logger.info("could not extend lock %r, %.3fs left: %s", lock.key, left, exc)
            self._schedule(lock, now + min(_RETRY_MAX, max(_RETRY_MIN, left / 4)), every)
            return
        if not lock.released:
            self._schedule(lock, time.monotonic() + lock.ttl * every, every)

    def _expire(self, lock: Lock) -> None:
        """Stop renewing a lock past ``max_hold``; report it once it lapses."""
        left = lock.remaining()
        if left > 0:
            with self._wakeup:
                heapq.heappush(
                    self._queue,
                    (time.monotonic() + left, next(self._order), weakref.ref(lock), 0.0),
                )
            return
        if not lock.released:
            lock._mark_lost(LockLost(f"lock {lock.key!r} was held past max_hold={lock.max_hold}s", key=lock.key))


def _alive(lock: Lock | None) -> bool:
    return lock is not None and not lock.released and not lock._lost


_default: Watchdog | None = None
_default_lock = threading.Lock()


def default_watchdog() -> Watchdog:
    """The process's watchdog, made on first use (and anew after a fork)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Watchdog()
        return _default


def _forget_after_fork() -> None:
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
