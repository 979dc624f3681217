"""Several ``celery beat`` instances at once, each due run published once.

Configure ``beat_scheduler = "celery_dlock.beat:MultiBeatScheduler"``; how it
works is in ``docs/beat.md``.
"""

from __future__ import annotations

from .scheduler import (
    ENTRY_HEADER,
    MAX_INSTANCES,
    RETRY_INTERVAL,
    SLOT_HEADER,
    STALL_ALLOWANCE,
    MultiBeatScheduler,
)
from .slots import CLAIM_PREFIX, Slot, locate

__all__ = [
    "CLAIM_PREFIX",
    "ENTRY_HEADER",
    "MAX_INSTANCES",
    "RETRY_INTERVAL",
    "SLOT_HEADER",
    "STALL_ALLOWANCE",
    "MultiBeatScheduler",
    "Slot",
    "locate",
]
