"""The lock core: Redlock over one or more Redis masters, with no Celery.

Everything here imports only the standard library and redis-py; the
layering rule is written in ``docs/architecture.md`` and checked by
import-linter in CI.
"""

from __future__ import annotations

from .errors import AlreadyQueued, ConfigurationError, DLockError, LockBusy, LockLost, LockUnavailable, TaskSkipped
from .handoff import AlreadyClaimed, Handoff, HandoffPending, HandoffQueue, QueuedLock, QueueFull
from .keyspace import Keyspace
from .redlock import Lock, LostCallback, Redlock
from .watchdog import Watchdog, default_watchdog

__all__ = [
    "AlreadyClaimed",
    "AlreadyQueued",
    "ConfigurationError",
    "DLockError",
    "Handoff",
    "HandoffPending",
    "HandoffQueue",
    "Keyspace",
    "Lock",
    "LockBusy",
    "LockLost",
    "LockUnavailable",
    "LostCallback",
    "QueueFull",
    "QueuedLock",
    "Redlock",
    "TaskSkipped",
    "Watchdog",
    "default_watchdog",
]
