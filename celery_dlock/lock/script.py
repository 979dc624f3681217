"""The form of every Lua script, and the named outcomes their wrappers return.

A :class:`Script` names its keys and arguments once, in Python, and turns
those names into Lua locals at the top of its source, so no script body
refers to ``KEYS[n]`` or ``ARGV[n]``.  The scripts themselves are in
:mod:`~celery_dlock.lock.scripts` and :mod:`~celery_dlock.lock.queue_scripts`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .keyspace import RESERVED_OWNER
from .resp import pack

__all__ = [
    "Arg",
    "Granted",
    "HandedOff",
    "Held",
    "KeyFree",
    "NotOurs",
    "Parked",
    "QueueFilled",
    "Released",
    "Script",
    "TicketSpent",
    "reply_status",
    "reply_text",
]

#: An argument as sent: text, bytes or an integer.
Arg = str | bytes | int


@dataclass(frozen=True)
class Script:
    """A Lua script, the names of its keys and arguments, and its SHA1.

    A name ending in ``?`` is optional: it is ``nil`` in Lua when the call
    leaves it out, and only trailing names may be left out.
    """

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    source: str = field(init=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        lines = [f"local {name.rstrip('?')} = KEYS[{i}]" for i, name in enumerate(self.keys, 1)]
        lines += [f"local {name.rstrip('?')} = ARGV[{i}]" for i, name in enumerate(self.args, 1)]
        lines.append(f"local RESERVED = '{RESERVED_OWNER}'")
        source = "\n".join(lines) + "\n" + self.body
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "sha", hashlib.sha1(source.encode()).hexdigest())

    def call(self, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
        """The packed EVALSHA of this script with ``keys`` and ``args``, in declared order."""
        return pack("EVALSHA", self.sha, len(keys), *keys, *args)


# -- named outcomes -----------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """The lock is the caller's, newly or already; it carries this fencing token."""

    token: int


@dataclass(frozen=True)
class Held:
    """Another owner holds the lock: its metadata (raw JSON) and lease left."""

    meta: bytes | None
    pttl_ms: int


@dataclass(frozen=True)
class NotOurs:
    """The lock was not the caller's: nothing changed."""


@dataclass(frozen=True)
class Released:
    """The caller's lock is gone; ``ticket`` and ``payload`` are set when it was handed on."""

    ticket: str | None = None
    payload: bytes | None = None


@dataclass(frozen=True)
class HandedOff:
    """The key is now reserved for the parked ``ticket``, whose payload must be published."""

    ticket: str
    payload: bytes


@dataclass(frozen=True)
class KeyFree:
    """Nothing to do: the key was free (or, for a sweep, held or with an empty queue)."""


@dataclass(frozen=True)
class QueueFilled:
    """The key's queue already holds its limit of tickets."""


@dataclass(frozen=True)
class Parked:
    """The payload is parked and rides on ``ticket`` (another's, when coalesced)."""

    ticket: str


@dataclass(frozen=True)
class TicketSpent:
    """The ticket was claimed already: this copy is a duplicate."""


def reply_text(value: bytes | str) -> str:
    """A reply element as text."""
    return value.decode() if isinstance(value, bytes) else value


def reply_status(reply: Any) -> bytes | None:
    """The status word a script put first in its reply, or ``None`` for an error or no reply."""
    return reply[0] if isinstance(reply, list) and reply else None
