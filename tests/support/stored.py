"""Reading a lock straight from one node, as the scripts stored it."""

from __future__ import annotations

from typing import Any

from celery_dlock.lock.metadata import StoredLock, parse_lock


def stored_lock(client: Any, name: str) -> StoredLock | None:
    """The lock named ``name`` on the node ``client`` talks to, or ``None`` if it holds none."""
    return parse_lock(client.get(name))


def stored_owner(client: Any, name: str) -> str | None:
    """The owner of the lock named ``name`` on ``client``'s node, or ``None``."""
    stored = stored_lock(client, name)
    return None if stored is None else stored.owner


def stored_token(client: Any, name: str) -> int | None:
    """The fencing token of the lock named ``name`` on ``client``'s node, or ``None``."""
    stored = stored_lock(client, name)
    return None if stored is None else stored.token
