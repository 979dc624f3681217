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

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from .errors import DLockError, LockLost

__all__ = ["Renewable", "Watchdog", "default_watchdog"]

logger = logging.getLogger(__name__)

#: Shortest and longest pause between renewal attempts after a node error.
_RETRY_MIN = 0.05
_RETRY_MAX = 1.0

#: The thread looks at its locks at least this often, so a new lock whose
#: first renewal is further off than this never has to wake it: registering
#: and releasing a lock cost a dict insert and delete, not a context switch.
IDLE_TICK = 1.0


class Renewable(Protocol):
    """What the watchdog needs of a lock: a :class:`~celery_dlock.lock.lease.Lock` is one."""

    key: str
    ttl: float
    max_hold: float | None
    acquired_at: float

    @property
    def released(self) -> bool:
        """Whether the holder released it."""
        ...

    @property
    def finished(self) -> bool:
        """Released, or its loss already reported: nothing left to renew."""
        ...

    def remaining(self) -> float:
        """Seconds of validity left."""
        ...

    def renew(self, ttl: float | None = None) -> None:
        """Renew the lease in full; raises :class:`~celery_dlock.lock.errors.DLockError` on failure."""
        ...

    def report_lost(self, error: DLockError) -> None:
        """Record and report that the lock is lost."""
        ...


class _Watch:
    """One watched lock: a weak reference, its renewal period and next due time."""

    __slots__ = ("due", "every", "ref")

    def __init__(self, lock: Renewable, every: float, due: float) -> None:
        self.ref = weakref.ref(lock)
        self.every = every
        self.due = due


class Watchdog:
    """A daemon thread that keeps leases alive, started on first use."""

    def __init__(self, name: str = "celery-dlock-watchdog") -> None:
        self.name = name
        self._watched: dict[int, _Watch] = {}
        self._jobs: list[tuple[float, Callable[[], None]]] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0

    def __len__(self) -> int:
        """How many locks are being kept alive."""
        with self._wakeup:
            return sum(1 for watch in self._watched.values() if _alive(watch.ref()))

    def watch(self, lock: Renewable, every: float) -> None:
        """Renew ``lock`` each time ``every`` (a share of its ttl) has passed."""
        self._schedule(lock, every, time.monotonic() + lock.ttl * every)

    def forget(self, lock: Renewable) -> None:
        """Stop renewing ``lock`` (it was released)."""
        with self._wakeup:
            watch = self._watched.get(id(lock))
            if watch is not None and watch.ref() is lock:
                del self._watched[id(lock)]

    def call_later(self, delay: float, job: Callable[[], None]) -> None:
        """Run ``job`` once on the thread after ``delay`` seconds (for batched writes such as counters)."""
        with self._wakeup:
            due = time.monotonic() + delay
            self._jobs.append((due, job))
            self._wake_for(due)

    def _schedule(self, lock: Renewable, every: float, due: float) -> None:
        with self._wakeup:
            self._watched[id(lock)] = _Watch(lock, every, due)
            self._wake_for(due)

    def _wake_for(self, due: float) -> None:
        """Start the thread, or wake it if it sleeps past ``due``; the caller holds ``_wakeup``."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        elif due < self._wakes_at:
            self._wakeup.notify()

    def _run(self) -> None:
        while True:
            try:
                locks, jobs = self._due()
                for lock, every in locks:
                    self._renew(lock, every)
                for job in jobs:
                    _run_job(job)
            except Exception:  # the thread must outlive any bug in a renewal
                logger.exception("watchdog renewal failed unexpectedly")

    def _due(self) -> tuple[list[tuple[Renewable, float]], list[Callable[[], None]]]:
        """Sleep until a lock or a job is due, then take the due ones off their lists."""
        with self._wakeup:
            while True:
                now = time.monotonic()
                due: list[tuple[Renewable, float]] = []
                jobs = [job for at, job in self._jobs if at <= now]
                self._jobs = [(at, job) for at, job in self._jobs if at > now]
                next_due = min([now + IDLE_TICK, *(at for at, _ in self._jobs)])
                for key, watch in list(self._watched.items()):
                    lock = watch.ref()
                    if not _alive(lock):
                        del self._watched[key]
                    elif watch.due <= now:
                        del self._watched[key]
                        due.append((lock, watch.every))  # type: ignore[arg-type]
                    else:
                        next_due = min(next_due, watch.due)
                if due or jobs:
                    self._wakes_at = 0.0
                    return due, jobs
                self._wakes_at = next_due
                self._wakeup.wait(next_due - now)

    def _renew(self, lock: Renewable, every: float) -> None:
        now = time.monotonic()
        if lock.max_hold is not None and now - lock.acquired_at >= lock.max_hold:
            self._expire(lock, every)
            return
        try:
            lock.renew()
        except LockLost as exc:
            lock.report_lost(exc)
            return
        except DLockError as exc:
            left = lock.remaining()
            if left <= 0:
                lock.report_lost(exc)
                return
            logger.info("could not extend lock %r, %.3fs left: %s", lock.key, left, exc)
            self._schedule(lock, every, now + min(_RETRY_MAX, max(_RETRY_MIN, left / 4)))
            return
        if not lock.released:
            self._schedule(lock, every, time.monotonic() + lock.ttl * every)

    def _expire(self, lock: Renewable, every: float) -> None:
        """Stop renewing a lock past ``max_hold``; report it once it lapses."""
        left = lock.remaining()
        if left > 0:
            self._schedule(lock, every, time.monotonic() + left)
            return
        if not lock.released:
            lock.report_lost(LockLost(f"lock {lock.key!r} was held past max_hold={lock.max_hold}s", key=lock.key))


def _run_job(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:
        logger.exception("watchdog job %r failed", job)


def _alive(lock: Renewable | None) -> bool:
    return lock is not None and not lock.finished


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
