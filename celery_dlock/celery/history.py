"""The history of each key: a capped Redis stream of its grants, releases, losses and forced releases.

Opt-in with ``dlock_history = N``: each key's stream (``Keyspace.history``)
keeps its latest ``N`` entries (``XADD ... MAXLEN N``) and expires
:data:`RETENTION` after its last one, so keys no longer used go away.

Entries are written the way the counters are: kept in the process and sent
to every node at most :data:`FLUSH_EVERY` seconds after they happened, from
the watchdog thread, without waiting for the replies.  A task therefore pays
no Redis command for them; the price is that a process killed outright loses
its last second of entries, as it loses its last counts.  Why this and not an
``XADD`` inside the lock scripts is in ``docs/operations.md``.

:meth:`HistoryLog.read` reads a stream back for ``celery dlock history``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..lock.errors import LockUnavailable
from ..lock.fanout import fan_out
from ..lock.redlock import Redlock
from ..lock.resp import pack

__all__ = ["EVENTS", "FLUSH_EVERY", "RETENTION", "Entry", "HistoryLog"]

#: What an entry can record.
EVENTS: Final = ("granted", "released", "kept", "lost", "forced")

#: Seconds at most between an entry and its write.
FLUSH_EVERY: Final = 1.0

#: A key's stream expires this many seconds after its last entry: a week.
RETENTION: Final = 7 * 24 * 3600


@dataclass(frozen=True)
class Entry:
    """One happening to a key's lock."""

    #: One of :data:`EVENTS`.
    event: str
    #: When it happened (Unix time, by the clock of the process that saw it).
    at: float
    #: The rest, as text: ``task``, ``task_id``, ``worker``, ``token``,
    #: ``held`` (seconds), ``reason``; for a forced release ``by`` (user@host) and ``command``.
    fields: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``event``, ``at`` and the fields."""
        return {"event": self.event, "at": self.at, **self.fields}


class HistoryLog:
    """Entries waiting to be appended to their keys' streams on ``redlock``'s nodes.

    ``keep`` is the length each stream is capped at; 0 records nothing.
    """

    def __init__(self, redlock: Redlock, keep: int) -> None:
        self.redlock = redlock
        self.keep = keep
        self._pending: list[tuple[str, Entry]] = []
        self._scheduled = False
        self._mutex = threading.Lock()
        self._pid = os.getpid()

    def record(self, key: str, event: str, **fields: Any) -> None:
        """Add an entry for ``key`` now; fields that are ``None`` are left out."""
        if not self.keep:
            return
        entry = Entry(event, time.time(), {name: str(value) for name, value in fields.items() if value is not None})
        with self._mutex:
            if self._pid != os.getpid():  # a forked child: the parent writes its own entries
                self._pid, self._pending, self._scheduled = os.getpid(), [], False
            self._pending.append((key, entry))
            first = not self._scheduled
            self._scheduled = True
        if first:
            self.redlock.watchdog.call_later(FLUSH_EVERY, self.flush)

    def flush(self, *, wait: bool = False) -> None:
        """Send the pending entries to every node now.

        Without ``wait`` the replies are left unread (skipped with each
        connection's next command); ``wait=True`` reads them, for a process
        about to exit, such as ``celery dlock release``.
        """
        with self._mutex:
            pending, self._pending, self._scheduled = self._pending, [], False
        if not pending:
            return
        space = self.redlock.keyspace
        commands = []
        for key, entry in pending:
            values: list[str] = ["event", entry.event, "at", repr(entry.at)]
            for name, value in entry.fields.items():
                values += [name, value]
            commands.append(pack("XADD", space.history(key), "MAXLEN", self.keep, "*", *values))
        for key in dict.fromkeys(key for key, _ in pending):
            commands.append(pack("PEXPIRE", space.history(key), RETENTION * 1000))
        nodes = self.redlock.nodes
        if wait:
            for command in commands:
                fan_out([(node, command) for node in nodes], decided=lambda replies: False, timeout=1.0)
        else:
            fan_out([(node, command) for command in commands for node in nodes], decided=lambda r: True, timeout=0)

    def read(self, key: str, count: int) -> list[Entry]:
        """The latest ``count`` entries of ``key``, oldest first, from the first node that answers.

        Every node is sent the same entries, so one is enough.  This
        process's pending entries are written first.
        """
        self.flush()
        command = pack("XREVRANGE", self.redlock.keyspace.history(key), "+", "-", "COUNT", count)
        for node in self.redlock.nodes:
            reply = node.execute(command)
            if isinstance(reply, BaseException):
                continue
            entries = [_entry(values) for _id, values in reply]
            return sorted(entries, key=lambda entry: entry.at)
        raise LockUnavailable.for_key(key, attempts=1, reason="no node answered for the history")


def _entry(values: list[bytes]) -> Entry:
    fields: Mapping[str, str] = {
        name.decode(): value.decode() for name, value in zip(values[::2], values[1::2], strict=True)
    }
    rest = {name: value for name, value in fields.items() if name not in ("event", "at")}
    return Entry(fields.get("event", "?"), float(fields.get("at", 0.0)), rest)
