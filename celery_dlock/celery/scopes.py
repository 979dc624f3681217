"""The queue lock of a publish-time scope: its key, its owner, its lease, its release.

``scope="queue"``, ``"queue+run"`` and ``"life"`` take a second lock besides
the run lock: the *queue lock*, on the key ``queued:<key>``, taken when the
task is published (:mod:`celery_dlock.celery.publish`) and freed when the
body starts.  Its owner value starts with ``<task id>/queued/``, so anyone who
knows the task id frees it with :meth:`~celery_dlock.lock.redlock.Redlock.release_owner`:

* the run itself, once it starts (after taking its run lock, if it has one);
* the worker's ``task_revoked`` hook, for a message revoked or expired
  before it started;
* the publisher, at once, when the broker refused the message.

A message that is lost outright frees it when its lease ends: the
countdown or eta, plus ``queue_ttl``, and never past ``expires``.  A run that
waits its turn (requeued for a busy run lock, or parked in a handoff queue)
keeps the same task id, and so the same queue lock, which its later copy
frees when it starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from ..lock.errors import DLockError
from ..lock.redlock import Redlock

__all__ = [
    "QUEUE_KEY_PREFIX",
    "QUEUE_LOCK_KIND",
    "free_queue_lock",
    "holder_id",
    "queue_key",
    "queue_lease",
    "queue_owner",
]

logger = logging.getLogger(__name__)

#: The queue lock of ``<key>`` is the lock on ``queued:<key>``.
QUEUE_KEY_PREFIX: Final = "queued:"

#: The ``kind`` a queue lock records in its metadata, which ``celery dlock list`` shows.
QUEUE_LOCK_KIND: Final = "queue"

#: The shortest lease a queue lock gets, for a message whose ``expires`` has passed.
_MIN_LEASE: Final = 0.05


def queue_key(key: str) -> str:
    """The key of the queue lock of the run key ``key``."""
    return QUEUE_KEY_PREFIX + key


def queue_owner(task_id: str) -> str:
    """The start of the owner value of the queue lock taken for ``task_id``."""
    return f"{task_id}/queued/"


def queue_lease(
    queue_ttl: float, *, countdown: Any = None, eta: Any = None, expires: Any = None, now: float | None = None
) -> float:
    """Seconds a queue lock lives: until the message is due, plus ``queue_ttl``, but not past ``expires``.

    ``countdown`` is in seconds; ``eta`` and ``expires`` are datetimes, ISO
    8601 strings or (``expires``) seconds from now, as ``apply_async`` takes them.
    """
    now = time.time() if now is None else now
    due = 0.0
    if countdown:
        due = max(0.0, float(countdown))
    elif eta is not None:
        due = max(0.0, _instant(eta) - now)
    lease = due + queue_ttl
    if expires is not None:
        until = _instant(expires) - now if not isinstance(expires, (int, float)) else float(expires)
        lease = min(lease, max(until, _MIN_LEASE))
    return max(lease, _MIN_LEASE)


def _instant(value: Any) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return value.timestamp() if value.tzinfo is not None else value.astimezone().timestamp()
    return float(value)


def free_queue_lock(redlock: Redlock, key: str, task_id: str | None) -> bool:
    """Free the queue lock ``task_id`` took on the run key ``key``; True if it held one.

    Never raises for the nodes: a queue lock that cannot be freed now ends
    with its lease.
    """
    if not task_id:
        return False
    try:
        return redlock.release_owner(queue_key(key), queue_owner(task_id))
    except DLockError as exc:
        logger.warning("could not free the queue lock of %r for %s: %s", key, task_id, exc)
        return False


def holder_id(holder: Mapping[str, Any] | None) -> str | None:
    """The task id a lock's holder metadata names, if any."""
    label = (holder or {}).get("label")
    return label if isinstance(label, str) else None
