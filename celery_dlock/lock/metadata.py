"""The holder metadata stored with each lock: who holds it, since when, for what.

A JSON object with ``hostname``, ``pid``, ``acquired_at`` (Unix time) and
``label``, plus any caller details.  Operators read it; the lock never does.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["holder_metadata", "parse_metadata"]

_HOST = socket.gethostname()


def holder_metadata(label: str | None, details: Mapping[str, Any] | None = None) -> str:
    """The JSON metadata of a new holder in this process."""
    meta = {"hostname": _HOST, "pid": os.getpid(), "acquired_at": time.time(), "label": label}
    if details:
        meta.update(details)
    return json.dumps(meta)


def parse_metadata(raw: bytes | str | None) -> dict[str, Any] | None:
    """Stored metadata as a dict, or ``None`` if absent or unreadable."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
