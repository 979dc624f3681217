"""What a lock holds: the owner, the fencing token, and the holder metadata.

A lock is a Redis string of three lines: owner, token and meta, with
a fourth, empty line once an acquirer has found it held; the scripts write
it (:data:`~celery_dlock.lock.scripts.LOCK_VALUE`) and :func:`parse_lock`
reads it.

The metadata is a JSON object with ``hostname``, ``pid``, ``acquired_at``
(Unix time) and ``label``, plus any caller details.  It describes the holder
to operators and to the caller that finds the key busy; the lock's own
decisions never depend on it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .process import current_pid

__all__ = ["StoredLock", "holder_metadata", "lock_value", "parse_lock", "parse_metadata", "quorum_holder"]

_HOST = socket.gethostname()

#: The fields every holder's metadata has.
_STANDARD = frozenset({"hostname", "pid", "acquired_at", "label"})

#: The JSON of the fields every holder in one process shares, by process id.
_heads: dict[int, str] = {}


def holder_metadata(label: str | None, details: Mapping[str, Any] | None = None) -> str:
    """The JSON metadata of a new holder in this process (``details`` win over the standard fields)."""
    pid = current_pid()
    if details and not _STANDARD.isdisjoint(details):
        return json.dumps({"hostname": _HOST, "pid": pid, "acquired_at": time.time(), "label": label, **details})
    head = _heads.get(pid)
    if head is None:
        head = _heads[pid] = json.dumps({"hostname": _HOST, "pid": pid})[:-1]
    meta = f'{head}, "acquired_at": {time.time()!r}, "label": {json.dumps(label)}'
    if details:
        return f"{meta}, {json.dumps(dict(details))[1:]}"
    return meta + "}"


def parse_metadata(raw: bytes | str | None) -> dict[str, Any] | None:
    """Stored metadata as a dict, or ``None`` if absent or unreadable."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class StoredLock:
    """One node's copy of a lock: ``owner``, ``token`` and ``meta``."""

    owner: str
    token: int
    meta: dict[str, Any]


def lock_value(owner: str, token: int, meta: str) -> bytes:
    """The string the scripts store for a lock of ``owner`` with ``token`` and JSON ``meta``."""
    return f"{owner}\n{token}\n{meta}".encode()


def parse_lock(reply: Any) -> StoredLock | None:
    """A lock as ``GET`` returned it, or ``None`` if absent or not a lock string."""
    if isinstance(reply, str):
        reply = reply.encode()
    if not isinstance(reply, bytes) or not reply:
        return None
    owner, _, rest = reply.partition(b"\n")
    token, _, meta = rest.partition(b"\n")
    try:
        number = int(token)
    except ValueError:
        return None
    return StoredLock(owner.decode(errors="replace"), number, parse_metadata(meta.partition(b"\n")[0]) or {})


def quorum_holder(replies: Sequence[Any], quorum: int) -> dict[str, Any] | None:
    """The metadata and highest token of the owner whose lock at least ``quorum`` of ``replies`` (``GET``) hold."""
    copies: dict[str, list[StoredLock]] = {}
    for reply in replies:
        stored = parse_lock(reply)
        if stored is not None:
            copies.setdefault(stored.owner, []).append(stored)
    for held in copies.values():
        if len(held) >= quorum:
            return {**held[0].meta, "token": max(copy.token for copy in held)}
    return None
