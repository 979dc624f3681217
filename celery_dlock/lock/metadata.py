"""What a lock hash holds: the owner, the fencing token, and the holder metadata.

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

__all__ = ["StoredLock", "holder_metadata", "parse_lock_hash", "parse_metadata", "quorum_holder"]

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
    """One node's copy of a lock hash: ``owner``, ``token`` and ``meta``."""

    owner: str
    token: int
    meta: dict[str, Any]


def parse_lock_hash(reply: Any) -> StoredLock | None:
    """A lock hash as ``HGETALL`` returned it (raw, or as redis-py's dict), or ``None`` if absent."""
    if isinstance(reply, Mapping):
        fields = dict(reply)
    elif isinstance(reply, list):
        fields = dict(zip(reply[::2], reply[1::2], strict=True))
    else:
        return None
    if not fields:
        return None
    owner = fields.get(b"owner", b"")
    return StoredLock(
        owner.decode(errors="replace"), int(fields.get(b"token", 0)), parse_metadata(fields.get(b"meta")) or {}
    )


def quorum_holder(replies: Sequence[Any], quorum: int) -> dict[str, Any] | None:
    """The metadata and highest token of the owner whose lock hash at least ``quorum`` of ``replies`` hold."""
    copies: dict[str, list[StoredLock]] = {}
    for reply in replies:
        stored = parse_lock_hash(reply)
        if stored is not None:
            copies.setdefault(stored.owner, []).append(stored)
    for held in copies.values():
        if len(held) >= quorum:
            return {**held[0].meta, "token": max(copy.token for copy in held)}
    return None
