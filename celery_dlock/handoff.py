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
:class:`~celery_dlock.redlock.Redlock` over a single node.  Like the rest of
the core, this module knows nothing of Celery.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import scripts
from .errors import DLockError, LockBusy, LockUnavailable
from .nodes import Reply, pack
from .redlock import Lock, LostCallback, Redlock, _check_key, _check_ttl, _metadata, _parse_metadata

__all__ = ["AlreadyClaimed", "Handoff", "HandoffQueue", "QueueFull", "QueuedLock"]


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


class QueuedLock(Lock):
    """A lock whose release hands the key to the oldest parked ticket."""

    #: Set by :meth:`release` when a parked ticket's turn has come: the
    #: caller must publish it.
    handoff: Handoff | None = None

    def _release_io(self, confirm: bool) -> bool:
        # Always waits: the reply carries the next ticket's payload.
        queue: HandoffQueue = self._queue  # type: ignore[attr-defined]
        released, self.handoff = queue._hand_off(
            scripts.RELEASE_HANDOFF, self.key, self.owner, self.ttl, count_as=self.count_as
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
        self._queues_key = f"{redlock.key_prefix}queues"

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
        stays parked); if that error has a ``handoff``, the key was free but
        tickets were stranded, and it is now reserved for the oldest, which
        the caller must publish.  Raises :class:`AlreadyClaimed` for a ticket
        that already ran.
        """
        _check_key(key)
        ttl = _check_ttl(ttl)
        owner = owner_prefix + secrets.token_hex(16)
        ttl_ms = math.ceil(ttl * 1000)
        started = time.monotonic()
        reply = self._call(
            scripts.ACQUIRE_QUEUED,
            key,
            [self.redlock._fence_key, *self._counters(count_as)],
            owner,
            ttl_ms,
            _metadata(label, details),
            ticket or "",
            ttl_ms,
            key,
            self.redlock._channel(key),
            *([count_as] if count_as else []),
        )
        outcome = reply[0]
        if outcome == 1:
            lock = QueuedLock(
                self.redlock,
                key,
                owner,
                int(reply[1]),
                ttl,
                self.redlock._valid_until(started, ttl),
                label=label,
                on_lost=on_lost,
                max_hold=max_hold,
                count_as=count_as,
            )
            lock._queue = self  # type: ignore[attr-defined]
            self.redlock._watchdog_for_process().watch(lock, self.redlock.extend_every)
            return lock
        if outcome == 3:
            raise AlreadyClaimed(f"ticket {ticket!r} on {key!r} was claimed already", key=key)
        if outcome == 4:
            busy = LockBusy.for_key(key, attempts=1, detail="handing off to a parked ticket")
            busy.handoff = Handoff(key, _text(reply[1]), reply[2])  # type: ignore[attr-defined]
            raise busy
        raise LockBusy.for_key(key, attempts=1, holder=_parse_metadata(reply[1]), retry_after=int(reply[2]) / 1000)

    def park(self, key: str, ticket: str, payload: bytes, *, max_queued: int, coalesce: bool = False) -> str | None:
        """Park ``payload`` behind the holder of ``key``.

        Returns the ticket the payload now rides on: ``ticket``, or with
        ``coalesce`` possibly the ticket of an earlier payload it replaced.
        Returns ``None`` when the key is free, so the caller should acquire
        instead.  Raises :class:`QueueFull` past ``max_queued`` tickets.
        Parking the same ticket twice parks it once.
        """
        _check_key(key)
        reply = self._call(scripts.PARK, key, [], ticket, payload, max_queued, key, "1" if coalesce else "0")
        if reply[0] == 0:
            return None
        if reply[0] == 2:
            raise QueueFull.for_key(key, attempts=1, detail=f"its queue holds max_queued={max_queued} already")
        return _text(reply[1])

    def release_owner(self, key: str, owner_prefix: str, ttl: float) -> tuple[bool, Handoff | None]:
        """As :meth:`Redlock.release_owner`, handing the key on to its queue.

        ``ttl`` is the reservation's lease should a ticket's turn come.
        """
        _check_key(key)
        if not owner_prefix:
            raise ValueError("owner_prefix: must be a non-empty str")
        return self._hand_off(scripts.RELEASE_PREFIX_HANDOFF, key, owner_prefix, ttl)

    def sweep(self, reserve_ttl: float) -> list[Handoff]:
        """Hand off every queue whose lock is gone; returns what to publish.

        Run it now and then (the Celery worker does, on a timer): it rescues
        the tickets of a holder that died before it could hand off.
        """
        members = self._node.execute(pack("SMEMBERS", self._queues_key))
        if isinstance(members, BaseException):
            raise LockUnavailable.for_key(None, attempts=1, errors=[(self._node.name, members)])
        handoffs = []
        for raw in members:
            key = _text(raw)
            reply = self._call(scripts.SWEEP, key, [], math.ceil(reserve_ttl * 1000), key, self.redlock._channel(key))
            if reply[0] == 1:
                handoffs.append(Handoff(key, _text(reply[1]), reply[2]))
        return handoffs

    def queued(self, key: str) -> list[str]:
        """The tickets parked on ``key``, oldest first (for operators)."""
        reply = self._node.execute(pack("LRANGE", self._queue_keys(key)[1], 0, -1))
        if isinstance(reply, BaseException):
            raise LockUnavailable.for_key(key, attempts=1, errors=[(self._node.name, reply)])
        return [_text(ticket) for ticket in reply]

    # -- internals ---------------------------------------------------------------

    def _hand_off(
        self, script: scripts.Script, key: str, owner: str, ttl: float, *, count_as: str | None = None
    ) -> tuple[bool, Handoff | None]:
        try:
            reply = self._call(
                script,
                key,
                self._counters(count_as),
                owner,
                self.redlock._channel(key),
                math.ceil(ttl * 1000),
                key,
                *([count_as] if count_as else []),
            )
        except LockUnavailable:
            return False, None  # the lease runs out; the sweep hands the queue on
        if reply[0] == 0:
            return False, None
        if len(reply) == 3:
            return True, Handoff(key, _text(reply[1]), reply[2])
        return True, None

    def _queue_keys(self, key: str) -> list[str]:
        prefix = self.redlock.key_prefix
        return [f"{prefix}lock:{key}", f"{prefix}queue:{key}", f"{prefix}parked:{key}", self._queues_key]

    def _counters(self, count_as: str | None) -> list[str]:
        return [self.redlock._stats_key] if count_as else []

    def _call(self, script: scripts.Script, key: str, extra_keys: list[str], *args: Any) -> Sequence[Reply]:
        keys = self._queue_keys(key) + extra_keys
        reply = self._node.execute(pack("EVALSHA", script.sha, len(keys), *keys, *args))
        if isinstance(reply, BaseException):
            raise LockUnavailable.for_key(key, attempts=1, errors=[(self._node.name, reply)])
        return reply  # type: ignore[no-any-return]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
