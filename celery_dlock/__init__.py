"""celery_dlock: single-flight Celery tasks over a Redis Redlock lock.

The lock core (:class:`Redlock`, :class:`Lock` and the errors) imports only
the standard library and redis-py, and works without Celery.
"""

from __future__ import annotations

from .errors import ConfigurationError, DLockError, LockBusy, LockLost, LockUnavailable
from .redlock import Lock, Redlock
from .watchdog import Watchdog

__all__ = [
    "ConfigurationError",
    "DLockError",
    "Lock",
    "LockBusy",
    "LockLost",
    "LockUnavailable",
    "Redlock",
    "Watchdog",
]

__version__ = "0.1.0"
