"""Task messages in handoff queues: what is parked, and publishing it when its turn comes.

A parked message is the task's signature as JSON, without its task id (the
ticket becomes the id of the copy that is published) and without any old
ticket header.  A published copy claims the lock with the
:data:`~celery_dlock.celery.headers.TICKET_HEADER` it carries.
"""

from __future__ import annotations

import logging

from celery import Celery, Task
from celery.app.task import Context
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from ..lock.faults import fault_point
from ..lock.handoff import Handoff
from .app_state import locks_for
from .headers import TICKET_HEADER, lineage

__all__ = ["hand_on", "hand_on_stranded", "message_of", "publish_handoff", "ticket_of"]

logger = logging.getLogger(__name__)


def publish_handoff(app: Celery, handoff: Handoff) -> None:
    """Publish a parked message whose turn has come, claiming with its ticket."""
    fault_point("before-handoff-publish")
    message = json_loads(handoff.payload)
    signature = app.signature(message)
    options = dict(signature.options)
    headers = dict(options.pop("headers", None) or {})
    headers[TICKET_HEADER] = f"{handoff.ticket}@{options.get('retries', 0)}"
    options.pop("task_id", None)
    # Published from the holder's release: the copy is the parked task, not the holder's child.
    signature.apply_async(task_id=handoff.ticket, headers=headers, add_to_parent=False, **options)


def hand_on(app: Celery, handoff: Handoff) -> None:
    """Publish a handoff from a body's ``finally``, never failing the body for it.

    If the broker refuses it, the ticket stays at the head of its queue and
    the key stays reserved for it; the worker's sweep hands it on again once
    the reservation runs out.
    """
    try:
        publish_handoff(app, handoff)
    except Exception:
        logger.exception("could not hand %r on to %s; the sweep will retry", handoff.key, handoff.ticket)


def message_of(task: Task, request: Context) -> bytes:
    """The message to publish again at handoff: the task, its arguments and options."""
    signature = task.signature_from_request(request)
    message = dict(signature)
    options = dict(message.get("options") or {})
    headers = dict(options.get("headers") or {})
    headers.pop(TICKET_HEADER, None)
    headers.update(lineage(request))
    options["headers"] = headers
    options.pop("task_id", None)
    message["options"] = options
    encoded: str = json_dumps(message)
    return encoded.encode()


def ticket_of(request: Context) -> str | None:
    """The ticket a handed-off message claims with, unless a retry copied it."""
    value = (request.headers or {}).get(TICKET_HEADER)
    if not isinstance(value, str) or "@" not in value:
        return None
    ticket, _, retries = value.rpartition("@")
    return ticket if retries == str(request.retries) else None


def hand_on_stranded(app: Celery) -> list[Handoff]:
    """Publish the next message of every queue whose holder has gone; returns them.

    Raises :class:`~celery_dlock.lock.errors.LockUnavailable` if the lock node
    cannot be reached.
    """
    locks = locks_for(app)
    handoffs = locks.handoff_queue.sweep(locks.settings.default_ttl)
    for handoff in handoffs:
        publish_handoff(app, handoff)
    return handoffs
