"""What a holder knows of its lease without asking a node: whether it is still valid, and for how long.

:class:`LeaseState` is the part of a held lock that the sync
:class:`~celery_dlock.lock.lease.Lock` and the asyncio
:class:`~celery_dlock.aio.lock.AsyncLock` share: both keep the end of the
lease's validity on the monotonic clock (the plans compute it, see
:meth:`~celery_dlock.lock.plans.Rules.lease_end`) and judge it the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .errors import DLockError, LockLost

__all__ = ["LeaseState"]

logger = logging.getLogger(__name__)


class LeaseState:
    """A held lease as its holder sees it: its key, token, owner, validity, and whether it ended."""

    #: The key as the caller gave it, without the prefix.
    key: str
    #: The fencing token: strictly greater than every earlier holder's.
    token: int
    #: Called with the lock and the error when the watchdog finds it lost.
    on_lost: Callable[[Any, DLockError], None] | None
    _owner: str
    _valid_until: float
    _released: bool
    _lost: bool

    @property
    def owner(self) -> str:
        """The random value that identifies this holder on every node."""
        return self._owner

    @property
    def released(self) -> bool:
        """Whether the lock was released (by the sync client as the release starts, by the async one once answered)."""
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

    def remaining(self) -> float:
        """Seconds of validity left, on the monotonic clock (0 once released)."""
        if self._released:
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` if the lock is lost; call before a write."""
        if self.lost:
            raise LockLost(f"lock {self.key!r} (token {self.token}) is lost", key=self.key)

    def report_lost(self, error: DLockError) -> None:
        """Record the loss, log it and tell ``on_lost``; called by the watchdog."""
        self._lost = True
        logger.warning("lock %r (token %s) lost: %s", self.key, self.token, error)
        if self.on_lost is not None:
            try:
                self.on_lost(self, error)
            except Exception:
                logger.exception("on_lost callback for lock %r raised", self.key)
