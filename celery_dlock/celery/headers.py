"""The message headers the plugin reads and writes.

Headers travel with a task message, so they survive a requeue, a handoff and
a redelivery; the task reads them as ``self.request.<name>``.
"""

from __future__ import annotations

import time
from typing import Final

from celery.app.task import Context

__all__ = [
    "BEAT_ENTRY_HEADER",
    "BEAT_SLOT_HEADER",
    "FIRST_DELIVERY_HEADER",
    "REQUEUES_HEADER",
    "TICKET_HEADER",
    "first_delivery",
    "lineage",
]

#: Counts lock-busy requeues of one message, apart from ``retries``.
REQUEUES_HEADER: Final = "dlock_requeues"

#: A handed-off message's claim: ``<ticket>@<retries>``.  A copy made by
#: ``retry()`` carries the header but a higher ``retries``, and so counts as a
#: new arrival rather than a claim on a spent ticket.
TICKET_HEADER: Final = "dlock_ticket"

#: The entry name of a run published by :class:`~celery_dlock.beat.MultiBeatScheduler`.
BEAT_ENTRY_HEADER: Final = "dlock_beat_entry"

#: The slot (its instant, UTC ISO 8601) of a run published by the multi-beat
#: scheduler; ``single_flight(hold=period)`` reads it to place the run in its period.
BEAT_SLOT_HEADER: Final = "dlock_beat_slot"

#: When the message was first delivered (Unix time), carried by its requeued
#: and parked copies, so that a lock wait is measured across all of them.
FIRST_DELIVERY_HEADER: Final = "dlock_first_delivery"


def first_delivery(request: Context | None) -> float:
    """When the message of the run ``request`` was first delivered: its header, else now.

    On a first delivery the header is set on the request, so the copies a
    requeue or a park publishes from it carry it on.
    """
    now = time.time()
    if request is None or request.called_directly:
        return now
    headers = request.headers
    if headers is None:
        headers = request.headers = {}
    stamped = headers.get(FIRST_DELIVERY_HEADER)
    if isinstance(stamped, (int, float)) and not isinstance(stamped, bool):
        return float(stamped)
    headers[FIRST_DELIVERY_HEADER] = now
    return now


def lineage(request: Context) -> dict[str, str | None]:
    """The ``parent_id`` and ``root_id`` headers of a copy of the run ``request``: the run's own.

    A requeued or handed-off copy keeps the run's task id, and is published
    from inside a run (the original, or the holder it was parked behind).
    Left unset, Celery makes that running task the copy's parent
    (``app.send_task`` falls back to ``current_worker_task``), so Flower
    showed a requeued task as its own parent and child.  These two Celery
    protocol headers, passed in ``headers=``, override that fallback.
    """
    return {"parent_id": request.parent_id, "root_id": request.root_id or request.id}
