"""The busy policies: what a run does when its key is held or the lock service is down.

Each function returns the exception the run ends with (``Ignore`` once a
copy was requeued or the run skipped, else a lock error), so the caller ends
the run with one ``raise``.  Adding a policy is described in
``docs/architecture.md``.
"""

from __future__ import annotations

import random
from typing import Final

from celery import Celery, Task, states
from celery.app.task import Context
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from ..lock.errors import DLockError, LockBusy, LockUnavailable, TaskSkipped
from ..lock.handoff import QueueFull
from .events import Throttle, report, store_outcome
from .headers import REQUEUES_HEADER, TICKET_HEADER, lineage
from .options import Policy

__all__ = ["backoff", "busy_action", "on_busy", "outside_worker", "requeue"]

logger = get_task_logger(__name__)

#: At most one WARNING per this many seconds while the lock service is unreachable.
UNREACHABLE_WARNING_INTERVAL: Final = 30.0

_unreachable = Throttle(UNREACHABLE_WARNING_INTERVAL)

#: Queueing policies fall back to a requeue when they cannot park.
_FALLBACKS: Final = {"queue": "requeue", "coalesce": "requeue"}


def outside_worker(request: Context | None) -> bool:
    """Whether a run is a direct call or an eager one, with no message to requeue."""
    return request is None or bool(request.called_directly) or bool(request.is_eager)


def busy_action(policy: Policy, request: Context | None, busy: LockBusy) -> str:
    """What :func:`on_busy` does with a run whose key is held: ``requeue``, ``skip`` or ``raise``."""
    if isinstance(busy, QueueFull) and policy.queue_full == "reject":
        return "raise"
    if request is not None and request.id and busy.holder and busy.holder.get("label") == request.id:
        # Another copy of this very task holds the key: a redelivery, a
        # retry sent before that run released, or a message requeued after
        # its worker died.  Skipping or failing it would overwrite the
        # result of a run that may still succeed, or lose the task; it
        # waits its turn instead.
        return "requeue"
    action = policy.wait_fallback if policy.on_busy == "wait" else _FALLBACKS.get(policy.on_busy, policy.on_busy)
    if action == "requeue" and outside_worker(request):
        return "raise"
    return str(action)


def on_busy(task: Task | None, app: Celery, request: Context | None, policy: Policy, busy: LockBusy) -> BaseException:
    """What a run whose key is held ends with, under ``policy``."""
    action = busy_action(policy, request, busy)
    if action == "raise":
        return busy
    if action == "skip":
        return _skip(task, app, request, busy, outside_worker(request))
    return requeue(task, app, request, policy, busy)


def requeue(
    task: Task | None, app: Celery, request: Context | None, policy: Policy, cause: DLockError
) -> BaseException:
    """Publish a copy of the run with a back-off countdown; or give up past ``max_requeues``."""
    if task is None or request is None or outside_worker(request):
        return cause
    headers = dict(request.headers or {})
    headers.pop(TICKET_HEADER, None)
    done = int(headers.get(REQUEUES_HEADER, 0))
    if done >= policy.max_requeues:
        return _give_up(cause, done, policy.max_requeues)
    countdown = backoff(done, policy)
    headers[REQUEUES_HEADER] = done + 1
    headers.update(lineage(request))
    # The copy is this same task (same id), not a child of this run.
    task.signature_from_request(request, countdown=countdown, headers=headers).apply_async(add_to_parent=False)
    logger.info("requeued in %.2fs (%d/%d): %s", countdown, done + 1, policy.max_requeues, cause)
    if isinstance(cause, LockUnavailable):
        held = _unreachable.ready()
        if held is not None:
            more = f" ({held} more such requeue(s) since the last warning)" if held else ""
            logger.warning("the lock service is unreachable; requeueing tasks until it is back%s: %s", more, cause)
    report(app, task, request, "requeued", key=cause.key, countdown=countdown, requeues=done + 1)
    return _ignored()


def backoff(requeues: int, policy: Policy) -> float:
    """The countdown before requeue number ``requeues + 1``: doubling, capped, jittered."""
    ceiling = min(policy.requeue_max_delay, policy.requeue_delay * 2 ** min(requeues, 32))
    return random.uniform(ceiling / 2, ceiling)


def _skip(task: Task | None, app: Celery, request: Context | None, busy: LockBusy, direct: bool) -> BaseException:
    skipped = TaskSkipped.for_key(
        busy.key or "", attempts=busy.attempts, holder=busy.holder, detail="skipped (on_busy=skip)"
    )
    if direct or task is None or request is None:
        return skipped
    logger.warning("skipped: %s", skipped)
    report(app, task, request, "skipped", key=busy.key, holder=busy.holder, exception=repr(skipped))
    store_outcome(app, task, request, states.FAILURE, skipped)
    return _ignored()


def _give_up(cause: DLockError, done: int, limit: int) -> DLockError:
    detail = f"requeued {done} time(s), max_requeues={limit}"
    if isinstance(cause, LockBusy):
        return LockBusy.for_key(cause.key or "", attempts=done, holder=cause.holder, detail=detail)
    errors = cause.errors if isinstance(cause, LockUnavailable) else ()
    return LockUnavailable.for_key(cause.key, attempts=done, errors=errors, reason=f"unreachable; {detail}")


def _ignored() -> BaseException:
    """What a run ends with once its message was dealt with: Celery acks it, stores nothing."""
    ignore: BaseException = Ignore()
    return ignore
