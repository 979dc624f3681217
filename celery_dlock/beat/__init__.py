"""Several ``celery beat`` instances at once, each due run published once.

Configure ``beat_scheduler = "celery_dlock.beat:MultiBeatScheduler"`` (Celery's
persistent scheduler), or ``"celery_dlock.beat:ClaimingScheduler"`` with
``dlock_beat_scheduler`` naming another scheduler, such as django-celery-beat's
``"django_celery_beat.schedulers:DatabaseScheduler"``; how it works is in
``docs/beat.md``.
"""

from __future__ import annotations

from .claims import ENTRY_HEADER, RETRY_INTERVAL, SLOT_HEADER, STALL_ALLOWANCE, MultiBeatMixin
from .scheduler import MAX_INSTANCES, MultiBeatScheduler
from .schedulers import ClaimingScheduler, claiming_scheduler, scheduler_class
from .slots import CLAIM_PREFIX, Slot, locate

__all__ = [
    "CLAIM_PREFIX",
    "ENTRY_HEADER",
    "MAX_INSTANCES",
    "RETRY_INTERVAL",
    "SLOT_HEADER",
    "STALL_ALLOWANCE",
    "ClaimingScheduler",
    "MultiBeatMixin",
    "MultiBeatScheduler",
    "Slot",
    "claiming_scheduler",
    "locate",
    "scheduler_class",
]
