"""Every Redis key and channel name the package uses, built in one place.

No other module formats a Redis key: they ask a :class:`Keyspace` for it.
On a Redis Cluster every name of one key carries the same hash tag (the
shortest tag of the key's own slot), so a script's keys share a slot, and
the node-wide fencing counter and queue index are kept once per tag.  The table of keys, with their types and
lifetimes, is in ``docs/architecture.md``.
"""

from __future__ import annotations

import binascii
import functools
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_PREFIX", "RESERVED_OWNER", "SLOTS", "Keyspace", "glob_escape", "key_slot", "slot_tag"]

#: The prefix of every key unless ``key_prefix`` / ``dlock_key_prefix`` says otherwise.
DEFAULT_PREFIX: Final = "dlock:"

#: The owner value of a lock reserved for a parked ticket is this plus the ticket.
RESERVED_OWNER: Final = "park:"


#: How many hash slots a Redis Cluster has.
SLOTS: Final = 16384


def key_slot(name: str | bytes) -> int:
    """The Redis Cluster hash slot of the key ``name``, honouring its hash tag."""
    raw = name.encode() if isinstance(name, str) else name
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


def slot_tag(slot: int) -> str:
    """The shortest hash tag in ``slot``: the key ``{t}``, for this ``t``, hashes to ``slot``."""
    return _slot_tags()[slot]


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """The shortest hexadecimal number hashing to each slot, found once per process (about 0.1 s)."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    number = 0
    while missing:
        tag = format(number, "x")
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        number += 1
    return tuple(tag for tag in tags if tag is not None)


def glob_escape(text: str) -> str:
    """``text`` with Redis glob characters escaped, to match it literally."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


@dataclass(frozen=True)
class Keyspace:
    """The names of one prefix's keys: ``Keyspace("dlock:").lock("k") == "dlock:lock:k"``.

    With ``clustered=True`` (the keys live on a Redis Cluster) each name
    carries a hash tag made from the key: ``Keyspace("dlock:",
    clustered=True).lock("k") == "dlock:lock:{cd68}k"`` with ``"dlock:fence:{cd68}"``.
    """

    prefix: str = DEFAULT_PREFIX
    #: Whether the names are laid out for a Redis Cluster.
    clustered: bool = False

    def fence(self, key: str) -> str:
        """The fencing counter ``key``'s tokens come from (a string holding an integer; never expires).

        One per node; on a Cluster one per hash tag, in the slot of ``key``'s
        lock, so it moves with the lock when a slot is resharded.
        """
        return self._per_slot("fence", key)

    @property
    def stats(self) -> str:
        """The counters hash: ``<label>:<event>`` to a count (never expires)."""
        return f"{self.prefix}stats"

    def queues(self, key: str) -> str:
        """The set of keys whose handoff queue is not empty: on a Cluster, those with ``key``'s tag."""
        return self._per_slot("queues", key)

    def queue_sets(self) -> str:
        """The name of the :meth:`queues` set, or on a Cluster a SCAN ``MATCH`` pattern for every slot's."""
        return f"{glob_escape(self.prefix)}queues:*" if self.clustered else f"{self.prefix}queues"

    def lock(self, key: str) -> str:
        """The lock of ``key``: the string of its owner, token and meta (:mod:`.metadata`), expiring with the lease."""
        return f"{self.prefix}lock:{self._tagged(key)}"

    def permits(self, key: str) -> str:
        """The sorted set of ``key``'s semaphore permits: each owner, scored by its expiry (ms, server clock).

        It expires with its last permit; see :meth:`permit_holders`.
        """
        return f"{self.prefix}permits:{self._tagged(key)}"

    def permit_holders(self, key: str) -> str:
        """The hash from each permit owner of ``key`` to ``<token>|<meta>``, trimmed with :meth:`permits`."""
        return f"{self.prefix}holders:{self._tagged(key)}"

    def released(self, key: str) -> str:
        """The pub/sub channel on which a release of ``key`` wakes its waiters."""
        return f"{self.prefix}released:{key}"

    def queue(self, key: str) -> str:
        """The list of tickets parked on ``key``, oldest first."""
        return f"{self.prefix}queue:{self._tagged(key)}"

    def parked(self, key: str) -> str:
        """The hash from each parked ticket of ``key`` to its payload."""
        return f"{self.prefix}parked:{self._tagged(key)}"

    def history(self, key: str) -> str:
        """The capped stream of ``key``'s grants, releases, losses and forced releases (``dlock_history``)."""
        return f"{self.prefix}history:{self._tagged(key)}"

    def done(self, task_id: str) -> str:
        """The done-marker of a task run that succeeded (a string, expiring after the dedupe bound).

        Written by the Celery layer with ``dedupe_completed``, so that a
        redelivered copy of a task that already succeeded is not run again.
        """
        return f"{self.prefix}done:{self._tagged(task_id)}"

    def stats_field(self, label: str, event: str) -> str:
        """The field of :attr:`stats` counting ``event`` under ``label`` (the scripts spell it alike)."""
        return f"{label}:{event}"

    def split_stats_field(self, field: bytes | str) -> tuple[str, str]:
        """The label and event of a :attr:`stats` field (the inverse of :meth:`stats_field`)."""
        text = field.decode() if isinstance(field, bytes) else field
        label, _, event = text.rpartition(":")
        return label, event

    def lock_pattern(self, pattern: str = "*") -> str:
        """A SCAN ``MATCH`` pattern for the locks whose key matches the glob ``pattern``."""
        tag = "{*}" if self.clustered else ""
        return f"{glob_escape(self.prefix)}lock:{tag}{pattern}"

    def key_of_lock(self, name: bytes | str) -> str:
        """The key of a lock named ``name`` (the inverse of :meth:`lock`)."""
        text = name.decode() if isinstance(name, bytes) else name
        head = f"{self.prefix}lock:"
        if not text.startswith(head):
            raise ValueError(f"{text!r} is not a lock of prefix {self.prefix!r}")
        key = text[len(head) :]
        return key.partition("}")[2] if self.clustered else key

    def _tagged(self, key: str) -> str:
        return self._tag(key) + key if self.clustered else key

    def _tag(self, key: str) -> str:
        """``{t}``, where ``t`` is the shortest tag in the slot of ``key`` (braces in ``key`` play no part)."""
        return f"{{{slot_tag(binascii.crc_hqx(key.encode(), 0) % SLOTS)}}}"

    def _per_slot(self, name: str, key: str) -> str:
        """A node-wide key, or on a Cluster that key for ``key``'s tag."""
        if not self.clustered:
            return f"{self.prefix}{name}"
        return f"{self.prefix}{name}:{self._tag(key)}"
