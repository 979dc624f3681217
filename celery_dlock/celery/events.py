"""Celery monitoring events sent by the plugin.

``task-lock-acquired``, ``task-requeued``, ``task-skipped`` and
``task-lock-lost`` reach Flower and ``celery events`` like Celery's own task
events, and are sent only when those are (``worker_send_task_events``, or
``celery worker -E``).
"""

from __future__ import annotations

import logging
from typing import Any

from .app_state import locks_for

__all__ = ["send_task_event"]

logger = logging.getLogger(__name__)


def send_task_event(app: Any, type_: str, *, uuid: str | None, hostname: str | None, **fields: Any) -> None:
    """Send one task event for ``uuid`` if the worker sends task events."""
    if uuid is None or not locks_for(app).events:
        return
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(type_, uuid=uuid, **fields)
    except Exception:  # monitoring must never break a task
        logger.warning("could not send %s event for %s", type_, uuid, exc_info=True)
