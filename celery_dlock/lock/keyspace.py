"""Every Redis key and channel name the package uses, built in one place.

No other module formats a Redis key: they ask a :class:`Keyspace` for it.
The table of keys, with their types and lifetimes, is in
``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_PREFIX", "RESERVED_OWNER", "Keyspace", "glob_escape"]

#: The prefix of every key unless ``key_prefix`` / ``dlock_key_prefix`` says otherwise.
DEFAULT_PREFIX: Final = "dlock:"

#: The owner value of a lock reserved for a parked ticket is this plus the ticket.
RESERVED_OWNER: Final = "park:"


def glob_escape(text: str) -> str:
    """``text`` with Redis glob characters escaped, to match it literally."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


@dataclass(frozen=True)
class Keyspace:
    """The names of one prefix's keys: ``Keyspace("dlock:").lock("k") == "dlock:lock:k"``."""

    prefix: str = DEFAULT_PREFIX

    @property
    def fence(self) -> str:
        """The node's fencing counter (a string holding an integer; never expires)."""
        return f"{self.prefix}fence"

    @property
    def stats(self) -> str:
        """The counters hash: ``<label>:<event>`` to a count (never expires)."""
        return f"{self.prefix}stats"

    @property
    def queues(self) -> str:
        """The set of keys whose handoff queue is not empty."""
        return f"{self.prefix}queues"

    def lock(self, key: str) -> str:
        """The lock hash of ``key``: ``owner``, ``token`` and ``meta``, expiring with the lease."""
        return f"{self.prefix}lock:{key}"

    def released(self, key: str) -> str:
        """The pub/sub channel on which a release of ``key`` wakes its waiters."""
        return f"{self.prefix}released:{key}"

    def queue(self, key: str) -> str:
        """The list of tickets parked on ``key``, oldest first."""
        return f"{self.prefix}queue:{key}"

    def parked(self, key: str) -> str:
        """The hash from each parked ticket of ``key`` to its payload."""
        return f"{self.prefix}parked:{key}"

    def stats_field(self, label: str, event: str) -> str:
        """The field of :attr:`stats` counting ``event`` under ``label`` (the scripts spell it alike)."""
        return f"{label}:{event}"

    def split_stats_field(self, field: bytes | str) -> tuple[str, str]:
        """The label and event of a :attr:`stats` field (the inverse of :meth:`stats_field`)."""
        text = field.decode() if isinstance(field, bytes) else field
        label, _, event = text.rpartition(":")
        return label, event

    def lock_pattern(self, pattern: str = "*") -> str:
        """A SCAN ``MATCH`` pattern for the lock hashes whose key matches the glob ``pattern``."""
        return f"{glob_escape(self.prefix)}lock:{pattern}"

    def key_of_lock(self, name: bytes | str) -> str:
        """The key of a lock hash named ``name`` (the inverse of :meth:`lock`)."""
        text = name.decode() if isinstance(name, bytes) else name
        head = self.lock("")
        if not text.startswith(head):
            raise ValueError(f"{text!r} is not a lock of prefix {self.prefix!r}")
        return text[len(head) :]
