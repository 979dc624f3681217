"""The lock from asyncio: :class:`AsyncRedlock` and :class:`AsyncLock`.

The same algorithm, keys, scripts and fencing tokens as
:class:`celery_dlock.Redlock`, so a sync and an async holder of one key
exclude each other; like the lock core it never imports Celery.  See
``docs/asyncio.md``.
"""

from __future__ import annotations

from ..lock.errors import DLockError, LockBusy, LockLost, LockUnavailable
from .lock import AsyncLock, AsyncLostCallback
from .redlock import AsyncRedlock
from .watchdog import LoopWatchdog, loop_watchdog

__all__ = [
    "AsyncLock",
    "AsyncLostCallback",
    "AsyncRedlock",
    "DLockError",
    "LockBusy",
    "LockLost",
    "LockUnavailable",
    "LoopWatchdog",
    "loop_watchdog",
]
