"""celery_dlock: single-flight Celery tasks over a Redis Redlock lock.

The lock core (:class:`Redlock`, :class:`Lock` and the errors) imports only
the standard library and redis-py, and works without Celery.  The Celery
names (:class:`SingleFlightTask`, :func:`single_flight`, :func:`current_lock`)
are imported on first use, so ``import celery_dlock`` never imports Celery.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .lock import (
    AlreadyClaimed,
    AlreadyQueued,
    ConfigurationError,
    DLockError,
    Handoff,
    HandoffQueue,
    Lock,
    LockBusy,
    LockLost,
    LockUnavailable,
    QueueFull,
    Redlock,
    TaskSkipped,
    Watchdog,
)

if TYPE_CHECKING:
    from .beat import MultiBeatScheduler
    from .celery import SingleFlightOptions, SingleFlightTask, current_lock, single_flight

__all__ = [
    "AlreadyClaimed",
    "AlreadyQueued",
    "ConfigurationError",
    "DLockError",
    "Handoff",
    "HandoffQueue",
    "Lock",
    "LockBusy",
    "LockLost",
    "LockUnavailable",
    "MultiBeatScheduler",
    "QueueFull",
    "Redlock",
    "SingleFlightOptions",
    "SingleFlightTask",
    "TaskSkipped",
    "Watchdog",
    "current_lock",
    "single_flight",
]

__version__ = "0.1.0"

_CELERY_NAMES = {
    "MultiBeatScheduler": ".beat",
    "SingleFlightTask": ".celery",
    "SingleFlightOptions": ".celery",
    "current_lock": ".celery",
    "single_flight": ".celery",
}


def __getattr__(name: str) -> Any:
    module = _CELERY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
