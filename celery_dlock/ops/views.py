"""How the ``celery dlock`` commands print locks, their details and their history."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final

from .inspect import HeldLock
from .tables import duration, table, timestamp

__all__ = [
    "HISTORY_COLUMNS",
    "LIST_COLUMNS",
    "PERMIT_COLUMNS",
    "history_row",
    "history_table",
    "lock_details_text",
    "lock_row",
    "lock_table",
    "permit_table",
]

#: The columns of ``celery dlock list``.
LIST_COLUMNS: Final = ("KEY", "KIND", "TASK", "TASK ID", "HOST", "PID", "TOKEN", "TTL", "HELD")
#: The columns of ``celery dlock show`` for a key's semaphore permits.
PERMIT_COLUMNS: Final = ("TASK", "TASK ID", "HOST", "PID", "TOKEN", "TTL", "HELD")
#: The columns of ``celery dlock history``.
HISTORY_COLUMNS: Final = ("TIME", "EVENT", "TOKEN", "TASK", "TASK ID", "WORKER", "HELD", "DETAIL")


def history_table(entries: Sequence[dict[str, Any]]) -> str:
    """The table of ``celery dlock history``."""
    return table(HISTORY_COLUMNS, [history_row(entry) for entry in entries])


def history_row(entry: dict[str, Any]) -> list[str]:
    """One row of ``celery dlock history``: an entry's time, event, token, task, worker, hold and detail."""
    if entry["event"] == "forced":
        detail = f"by {entry.get('by', '?')} ({entry.get('command', 'release')})"
    else:
        detail = entry.get("reason", "")
    held = entry.get("held")
    return [
        timestamp(entry["at"], precise=True),
        entry["event"],
        entry.get("token", "-"),
        entry.get("task", "-"),
        entry.get("task_id", "-"),
        entry.get("worker", "-"),
        duration(float(held)) if held else "-",
        detail,
    ]


def lock_table(locks: Sequence[HeldLock]) -> str:
    """The table of ``celery dlock list``."""
    return table(LIST_COLUMNS, [lock_row(lock) for lock in locks])


def lock_row(lock: HeldLock) -> list[str]:
    """One lock's row of :func:`lock_table`."""
    task_id = f"{lock.task_id} (handoff)" if lock.reserved_for else lock.task_id
    return [
        lock.key,
        lock.kind,
        lock.task or "-",
        task_id or "-",
        lock.hostname or "-",
        str(lock.pid) if lock.pid is not None else "-",
        str(lock.token),
        duration(lock.ttl_left),
        duration(lock.held_for),
    ]


def permit_table(permits: Sequence[dict[str, Any]]) -> str:
    """The permit holders of a key, as :meth:`~celery_dlock.lock.redlock.Redlock.permit_holders` lists them."""
    rows = [
        [
            permit.get("task") or "-",
            permit.get("label") or "-",
            permit.get("hostname") or "-",
            str(permit.get("pid", "-")),
            str(permit["token"]),
            duration(float(permit["ttl"])),
            duration(time.time() - float(permit["acquired_at"])) if permit.get("acquired_at") else "-",
        ]
        for permit in permits
    ]
    return table(PERMIT_COLUMNS, rows)


def lock_details_text(lock: HeldLock) -> str:
    """What ``celery dlock show`` prints of one lock, a field a line."""
    shown = ("hostname", "pid", "label", "task", "acquired_at", "handoff", "kind")
    extra = {name: value for name, value in lock.meta.items() if name not in shown}
    reserved = f"yes, for parked ticket {lock.reserved_for}" if lock.reserved_for else "no"
    rows = [
        ("key", lock.key),
        ("kind", f"{lock.kind} lock" + (" (held from publish until the body starts)" if lock.kind == "queue" else "")),
        ("task", lock.task or "-"),
        ("task id", lock.task_id or "-"),
        ("hostname", lock.hostname or "-"),
        ("pid", str(lock.pid) if lock.pid is not None else "-"),
        ("token", str(lock.token)),
        ("ttl left", duration(lock.ttl_left)),
        ("held for", duration(lock.held_for)),
        ("acquired", timestamp(lock.meta.get("acquired_at"))),
        ("nodes", f"{lock.nodes} of {lock.of_nodes}"),
        ("handoff", reserved),
        *((name, json.dumps(value)) for name, value in sorted(extra.items())),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
