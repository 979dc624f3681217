"""Per-key FIFO handoff: a busy acquirer parks, the holder hands on at release.

Instead of polling, a caller that finds the key held *parks* a payload (for
Celery, the task message) in the key's queue and goes away.  When the holder
releases, on whatever path, the release itself reserves the lock for the
oldest parked ticket and returns its payload, which the releaser publishes
at once; the published copy then *claims* the lock with its ticket.  Nothing
parked is lost:

* a ticket leaves the queue only when a copy of its payload claims the lock,
  so a handoff lost in flight (the releaser died before publishing) is
  handed off again by the next acquirer, or by :meth:`HandoffQueue.sweep`
  once the reservation runs out;
* a payload delivered twice runs once: the second copy finds its ticket gone
  and gets :class:`AlreadyClaimed`.

With ``coalesce=True`` a new payload replaces the newest one not yet handed
off, so any number of requests during one run produce exactly one more run,
with the latest payload.

The queue lives on the lock's node, so a :class:`HandoffQueue` needs a
:class:`~celery_dlock.lock.redlock.Redlock` over a single node.  Like the rest of
the core, this module knows nothing of Celery.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from . import queue_scripts as scripts
from .errors import DLockError, LockBusy, LockUnavailable
from .lease import Lock, LostCallback
from .member import Reply
from .metadata import holder_metadata, parse_metadata
from .redlock import Redlock
from .resp import pack
from .script import Granted, HandedOff, Held, KeyFree, Parked, QueueFilled, Released, TicketSpent
from .tokens import token_floor
from .validation import check_key, check_owner_prefix, check_ttl

__all__ = ["AlreadyClaimed", "Handoff", "HandoffPending", "HandoffQueue", "QueueFull", "QueuedLock"]


@dataclass(frozen=True)
class Handoff:
    """A parked payload whose turn has come: publish it carrying ``ticket``."""

    key: str
    ticket: str
    payload: bytes


class AlreadyClaimed(DLockError):
    """The ticket was claimed by another copy of its payload: drop this one."""


class QueueFull(LockBusy):
    """The key's queue holds ``max_queued`` tickets already."""


class HandoffPending(LockBusy):
    """The key was free but parked tickets were stranded: publish :attr:`handoff`.

    The key is now reserved for that ticket, so this caller is busy too.
    """

    #: The stranded ticket's payload, which the caller must publish.
    handoff: Handoff

    @classmethod
    def stranded(cls, handoff: Handoff) -> HandoffPending:
        """The error for a key reserved for ``handoff`` just now."""
        error = cls.for_key(handoff.key, attempts=1, detail="handing off to a parked ticket")
        error.handoff = handoff
        return error


class QueuedLock(Lock):
    """A lock whose release hands the key to the oldest parked ticket."""

    def __init__(self, queue: HandoffQueue, *args: Any, **kwargs: Any) -> None:
        super().__init__(queue.redlock, *args, **kwargs)
        self._queue = queue
        #: Set by the release when a parked ticket's turn has come: the
        #: caller must publish it.
        self.handoff: Handoff | None = None

    def do_release(self, wait: bool) -> bool:
        """Release and hand on, always waiting: the reply carries the next ticket's payload."""
        released, self.handoff = self._queue.hand_on(
            scripts.release_handoff_call(
                self._queue.redlock.keyspace,
                self.key,
                owner=self.owner,
                reserve_ms=math.ceil(self.ttl * 1000),
            ),
            self.key,
        )
        return released


class HandoffQueue:
    """Handoff queues for the keys of one single-node :class:`Redlock`."""

    def __init__(self, redlock: Redlock) -> None:
        if len(redlock.nodes) != 1:
            raise ValueError(
                "nodes: a handoff queue lives on one Redis node; give dlock_redis_url a single URL "
                f"(got {len(redlock.nodes)})"
            )
        self.redlock = redlock
        self._node = redlock.nodes[0]
        self._space = redlock.keyspace

    def __repr__(self) -> str:
        return f"<HandoffQueue on {self._node.name}>"

    def acquire(
        self,
        key: str,
        ttl: float,
        *,
        ticket: str | None = None,
        on_lost: LostCallback | None = None,
        max_hold: float | None = None,
        label: str | None = None,
        owner_prefix: str = "",
        count_as: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> QueuedLock:
        """Take ``key`` once, without waiting; renewed by the watchdog.

        With ``ticket``, the caller is a handed-off payload claiming its turn.
        Raises :class:`LockBusy` if another owner holds the key (a ticket then
        stays parked), and its subclass :class:`HandoffPending` if the key was
        free but tickets were stranded: it is now reserved for the oldest,
        which the caller must publish.  Raises :class:`AlreadyClaimed` for a
        ticket that already ran.
        """
        check_key(key)
        ttl = check_ttl(ttl)
        owner = owner_prefix + secrets.token_hex(16)
        ttl_ms = math.ceil(ttl * 1000)
        started = time.monotonic()
        command = scripts.acquire_queued_call(
            self._space,
            key,
            owner=owner,
            lease_ms=ttl_ms,
            meta=holder_metadata(label, details),
            ticket=ticket,
            reserve_ms=ttl_ms,
            floor=token_floor(),
        )
        outcome = scripts.parse_acquire_queued(self._execute(command, key))
        if isinstance(outcome, Granted):
            watchdog = self.redlock.watchdog
            lock = QueuedLock(
                self,
                key,
                owner,
                outcome.token,
                ttl,
                self.redlock.lease_end(started, ttl),
                label=label,
                on_lost=on_lost,
                max_hold=max_hold,
                count_as=count_as,
                watchdog=watchdog,
            )
            watchdog.watch(lock, self.redlock.extend_every)
            if count_as:
                self.redlock.count(count_as, "acquired")
            return lock
        if isinstance(outcome, TicketSpent):
            raise AlreadyClaimed(f"ticket {ticket!r} on {key!r} was claimed already", key=key)
        if isinstance(outcome, HandedOff):
            raise HandoffPending.stranded(Handoff(key, outcome.ticket, outcome.payload))
        if isinstance(outcome, Held):
            if count_as:
                self.redlock.count(count_as, "busy")
            raise LockBusy.for_key(
                key, attempts=1, holder=parse_metadata(outcome.meta), retry_after=outcome.pttl_ms / 1000
            )
        raise _unexpected(key, outcome)

    def park(self, key: str, ticket: str, payload: bytes, *, max_queued: int, coalesce: bool = False) -> str | None:
        """Park ``payload`` behind the holder of ``key``.

        Returns the ticket the payload now rides on: ``ticket``, or with
        ``coalesce`` possibly the ticket of an earlier payload it replaced.
        Returns ``None`` when the key is free, so the caller should acquire
        instead.  Raises :class:`QueueFull` past ``max_queued`` tickets.
        Parking the same ticket twice parks it once.
        """
        check_key(key)
        command = scripts.park_call(
            self._space, key, ticket=ticket, payload=payload, max_queued=max_queued, coalesce=coalesce
        )
        outcome = scripts.parse_park(self._execute(command, key))
        if isinstance(outcome, KeyFree):
            return None
        if isinstance(outcome, QueueFilled):
            raise QueueFull.for_key(key, attempts=1, detail=f"its queue holds max_queued={max_queued} already")
        if isinstance(outcome, Parked):
            return outcome.ticket
        raise _unexpected(key, outcome)

    def release_owner(self, key: str, owner_prefix: str, ttl: float) -> tuple[bool, Handoff | None]:
        """As :meth:`Redlock.release_owner`, handing the key on to its queue.

        ``ttl`` is the reservation's lease should a ticket's turn come.
        """
        check_key(key)
        check_owner_prefix(owner_prefix, required=True)
        command = scripts.release_prefix_handoff_call(
            self._space, key, prefix=owner_prefix, reserve_ms=math.ceil(ttl * 1000)
        )
        return self.hand_on(command, key)

    def sweep(self, reserve_ttl: float) -> list[Handoff]:
        """Hand off every queue whose lock is gone; returns what to publish.

        Run it now and then (the Celery worker does, on a timer): it rescues
        the tickets of a holder that died before it could hand off.
        """
        handoffs = []
        for raw in self._queued_keys():
            key = raw.decode()
            command = scripts.sweep_call(self._space, key, reserve_ms=math.ceil(reserve_ttl * 1000))
            outcome = scripts.parse_sweep(self._execute(command, key))
            if isinstance(outcome, HandedOff):
                handoffs.append(Handoff(key, outcome.ticket, outcome.payload))
        return handoffs

    def _queued_keys(self) -> list[bytes]:
        """Every key whose queue is not empty, from the queue index (one set, or one per Cluster tag)."""
        try:
            sets = self._node.scan(self._space.queue_sets()) if self._space.clustered else [self._space.queue_sets()]
            keys: list[bytes] = []
            for name in sets:
                members = self._node.execute(pack("SMEMBERS", name))
                if isinstance(members, BaseException):
                    raise members
                keys += members
        except RedisError as exc:
            raise LockUnavailable.for_key(None, attempts=1, errors=[(self._node.name, exc)]) from None
        return keys

    def queued_keys(self) -> list[str]:
        """Every key with messages parked on it (for operators)."""
        return [key.decode() for key in self._queued_keys()]

    def queued(self, key: str) -> list[str]:
        """The tickets parked on ``key``, oldest first (for operators)."""
        reply = self._execute(pack("LRANGE", self._space.queue(key), 0, -1), key)
        return [ticket.decode() for ticket in reply]

    def parked_payloads(self, key: str, tickets: list[str]) -> list[bytes | None]:
        """The payloads parked on ``key`` under ``tickets``, in order (for operators)."""
        if not tickets:
            return []
        reply = self._execute(pack("HMGET", self._space.parked(key), *tickets), key)
        return list(reply)

    def hand_on(self, command: bytes, key: str) -> tuple[bool, Handoff | None]:
        """Run a packed release-and-hand-off script: whether it released, and the next ticket's turn.

        A node that cannot be reached releases nothing: the lease runs out and
        the sweep hands the queue on.
        """
        try:
            outcome = scripts.parse_release_handoff(self._execute(command, key))
        except LockUnavailable:
            return False, None
        if isinstance(outcome, Released):
            if outcome.ticket is not None and outcome.payload is not None:
                return True, Handoff(key, outcome.ticket, outcome.payload)
            return True, None
        return False, None

    def _execute(self, command: bytes, key: str) -> Reply:
        reply = self._node.execute(command)
        if isinstance(reply, BaseException):
            raise LockUnavailable.for_key(key, attempts=1, errors=[(self._node.name, reply)])
        return reply


def _unexpected(key: str, outcome: object) -> LockUnavailable:
    return LockUnavailable.for_key(key, attempts=1, reason=f"unexpected script reply {outcome!r}")
