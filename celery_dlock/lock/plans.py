"""The Redlock algorithm, written once and free of I/O: plans that yield requests and take back replies.

A *plan* is a generator.  It yields what it needs done, a :class:`Fan` (one
command to some nodes, with the rule that says when enough replies are in),
a :class:`Listen` (subscribe to a key's releases) or a :class:`Pause`
(wait), and is sent back the answer: the replies aligned with the fan's
targets, whether listening works, or ``None``.  It returns the outcome or
raises the error.  The quorum, validity, fencing, retry and repair rules
live here; a *driver* does the I/O: :func:`~celery_dlock.lock.driver.run`
over the sync nodes, and :func:`celery_dlock.aio.transport.drive` on an
event loop.  So the sync and the async client take the same decisions, and
a sync and an async holder of one key exclude each other.

Plans read the monotonic clock, which is not I/O: validity is measured from
before the first command is sent.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from . import scripts
from .errors import LockBusy, LockLost, LockUnavailable
from .keyspace import Keyspace
from .member import Reply
from .metadata import parse_metadata
from .quorum import decided, quorum_size
from .schemes import Scheme
from .script import Granted, Held
from .tokens import token_floor
from .waiting import Retries

__all__ = ["DRIFT_FLOOR", "Done", "Fan", "Listen", "Pause", "Plan", "Rules", "advance", "is_granted", "new_owner"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Redlock's allowance for clock drift beyond ``drift_factor``: 2 ms.
DRIFT_FLOOR: Final = 0.002


@dataclass(frozen=True)
class Fan:
    """Send ``command`` to the nodes at ``targets``; read replies until ``decided`` says enough are in.

    ``decided`` is given the replies so far, aligned with ``targets``, each a
    value, an exception or :data:`~celery_dlock.lock.member.NO_REPLY`.  One
    that is decided before any reply (:meth:`Rules.send`) is sent and not
    waited for.
    """

    command: bytes
    targets: tuple[int, ...]
    decided: Callable[[list[Reply]], bool]


@dataclass(frozen=True)
class Listen:
    """Subscribe to ``channel`` on every node that accepts it; answered True if any did."""

    channel: str


@dataclass(frozen=True)
class Pause:
    """Wait ``delay`` seconds, or less if a release arrives on the channel listened to."""

    delay: float


#: What a plan yields, is sent back, and returns.
Plan = Generator[Fan | Listen | Pause, Any, T]


@dataclass(frozen=True)
class Done(Generic[T]):
    """A plan's outcome, once it has no more requests."""

    value: T


def advance(plan: Plan[T], answer: Any) -> Fan | Listen | Pause | Done[T]:
    """Send ``answer`` (``None`` to start) to ``plan``: its next request, or :class:`Done` with its outcome.

    A plan's error is raised from here.
    """
    try:
        return plan.send(answer)
    except StopIteration as stop:
        return Done(stop.value)


def new_owner(prefix: str = "") -> str:
    """A holder's owner value: ``prefix`` then 128 random bits."""
    return prefix + secrets.token_hex(16)


def is_granted(reply: Reply) -> bool:
    """Whether an acquire script granted the lock."""
    return isinstance(reply, list) and bool(reply) and reply[0] == b"granted"


class Rules:
    """The Redlock decisions over the nodes called ``names``, in order.

    A lock needs a strict majority (:attr:`quorum`); one of the ``limit``
    permits of a semaphore needs more (:meth:`scheme`).
    """

    def __init__(self, names: Sequence[str], keyspace: Keyspace, *, drift_factor: float) -> None:
        self.names = list(names)
        self.keyspace = keyspace
        self.drift_factor = drift_factor
        #: How many nodes must agree on a lock, and on a fencing token: a strict majority.
        self.quorum = quorum_size(len(self.names))
        self._all = tuple(range(len(self.names)))
        self._schemes: dict[int, Scheme] = {}

    def scheme(self, limit: int = 1) -> Scheme:
        """The scripts and quorum size of keys admitting ``limit`` holders (made once per limit)."""
        found = self._schemes.get(limit)
        if found is None:
            found = self._schemes[limit] = Scheme(self.keyspace, limit, len(self.names))
        return found

    # -- requests ------------------------------------------------------------------

    def broadcast(self, command: bytes, yes: Callable[[Reply], bool], quorum: int) -> Fan:
        """``command`` to every node, decided once ``quorum`` said ``yes`` or can no longer."""
        total = len(self._all)
        return Fan(command, self._all, lambda replies: decided(replies, yes, quorum, total))

    def read_all(self, command: bytes) -> Fan:
        """``command`` to every node, every reply awaited (or its timeout)."""
        return Fan(command, self._all, lambda replies: False)

    def send(self, command: bytes, targets: Sequence[int] | None = None) -> Fan:
        """``command`` to ``targets`` (by default all), sent and not waited for."""
        return Fan(command, self._all if targets is None else tuple(targets), lambda replies: True)

    def errors(self, replies: Sequence[Reply], targets: Sequence[int] | None = None) -> list[tuple[str, BaseException]]:
        """``(node name, error)`` for each reply that is an error."""
        indices = self._all if targets is None else targets
        return [(self.names[i], r) for i, r in zip(indices, replies, strict=True) if isinstance(r, BaseException)]

    def lease_end(self, started: float, ttl: float) -> float:
        """When a lease of ``ttl`` granted after ``started`` stops being safe to rely on (monotonic)."""
        return started + ttl - (ttl * self.drift_factor + DRIFT_FLOOR)

    def undo(self, key: str, owner: str, limit: int = 1) -> bytes:
        """The release that undoes a failed attempt wherever it took the key, waking no waiter.

        Never resent later: the next attempt reuses the owner, and a late undo
        would delete the lock that attempt took.  Sent on the connection the
        next attempt uses, it is always run before it.
        """
        return self.scheme(limit).release(key, owner=owner, notify=False)

    # -- plans -------------------------------------------------------------------------

    def acquire(
        self,
        key: str,
        owner: str,
        ttl: float,
        meta: str,
        retries: Retries,
        *,
        on_busy: Callable[[], None] | None = None,
        limit: int = 1,
    ) -> Plan[tuple[int, float]]:
        """Attempt until granted, listening for releases while the key is held; ``(token, valid_until)``."""
        attempts = 0
        listening = False
        while True:
            attempts += 1
            outcome = yield from self.attempt(key, owner, ttl, meta, attempts, limit=limit)
            if not isinstance(outcome, (LockBusy, LockUnavailable)):
                return outcome
            if isinstance(outcome, LockBusy) and on_busy is not None:
                on_busy()
            delay, listen = retries.pause(outcome, attempts, listening=listening)
            if listen:
                # Listen first, then look again, so that a release between the
                # attempt and the subscription is not missed.
                listening = yield Listen(self.keyspace.released(key))
                if listening:
                    continue
            yield Pause(delay)

    def attempt(
        self, key: str, owner: str, ttl: float, meta: str, attempt: int, *, limit: int = 1
    ) -> Plan[tuple[int, float] | LockBusy | LockUnavailable]:
        """Try once for ``owner``: ``(token, valid_until)``, or the error to raise (undone where it took)."""
        started = time.monotonic()
        scheme = self.scheme(limit)
        command = scheme.acquire(key, owner=owner, lease_ms=math.ceil(ttl * 1000), meta=meta, floor=token_floor())
        replies = yield self.broadcast(command, is_granted, scheme.size)
        outcomes = [scripts.parse_acquire(reply) for reply in replies]
        tokens = {i: o.token for i, o in enumerate(outcomes) if isinstance(o, Granted)}

        if len(tokens) >= scheme.size:
            token = max(tokens.values())
            fenced = yield from self.fence(key, token, tokens)
            if fenced:
                valid_until = self.lease_end(started, ttl)
                if time.monotonic() < valid_until:
                    return token, valid_until
                reason = "the lease ran out while acquiring"
            else:
                reason = "the fencing token could not be stored on a quorum"
            yield self.send(self.undo(key, owner, limit))
            return LockUnavailable.for_key(key, attempts=attempt, errors=self.errors(replies), reason=reason)

        busy = [o for o in outcomes if isinstance(o, Held)]
        maybe_ours = [i for i, o in enumerate(outcomes) if not isinstance(o, Held)]
        if maybe_ours:
            yield self.send(self.undo(key, owner, limit), maybe_ours)
        # Busy when holders alone leave too few nodes to grant, or holders and
        # grants together were a quorum; the read stops as soon as that is known.
        if len(busy) <= len(self.names) - scheme.size and len(tokens) + len(busy) < scheme.size:
            return LockUnavailable.for_key(key, attempts=attempt, errors=self.errors(replies))
        holder = next((parse_metadata(o.meta) for o in busy if o.meta), None)
        retry_after = max(o.pttl_ms for o in busy) / 1000 if busy else None
        return LockBusy.for_key(key, attempts=attempt, holder=holder, retry_after=retry_after, limit=limit)

    def fence(self, key: str, token: int, tokens: dict[int, int]) -> Plan[bool]:
        """Make sure a quorum's counters are at least ``token``.

        Tokens must rise across holders even when their quorums differ; that
        holds once every token was written to a quorum before it was handed
        out, since any later quorum then meets one of those nodes.  Usually the
        granting nodes already agree and no write is needed.
        """
        already = sum(1 for t in tokens.values() if t == token)
        if already >= self.quorum:
            return True
        behind = tuple(i for i, t in tokens.items() if t < token)

        def enough(replies: list[Reply]) -> bool:
            return already + sum(1 for r in replies if scripts.fenced(r)) >= self.quorum

        replies = yield Fan(scripts.fence_floor_call(self.keyspace, key, token), behind, enough)
        return enough(replies)

    def renew(self, key: str, owner: str, ttl: float, *, token: int = 0, meta: str = "", limit: int = 1) -> Plan[float]:
        """Renew ``owner``'s lease on a quorum; the new end of its validity.

        Nodes found without the lock (restarted empty, say) get it back, with
        ``token`` and ``meta`` and only the validity left, once a quorum has
        renewed it.  Raises :class:`LockLost` when a quorum no longer holds it
        for ``owner``, and :class:`LockUnavailable` when too few answered.
        """
        started = time.monotonic()
        scheme = self.scheme(limit)
        replies = yield self.read_all(
            scheme.extend(key, owner=owner, lease_ms=math.ceil(ttl * 1000))
        )  # every reply: the nodes that lost it are repaired
        valid_until = self.lease_end(started, ttl)
        left_ms = math.floor((valid_until - time.monotonic()) * 1000)
        if sum(1 for r in replies if scripts.done(r)) >= scheme.size and left_ms > 0:
            lost = [i for i, reply in enumerate(replies) if scripts.missing(reply)]
            if lost:
                yield self.send(scheme.repair(key, owner=owner, token=token, meta=meta, lease_ms=left_ms), lost)
            return valid_until
        if sum(1 for r in replies if scripts.refused(r) or scripts.missing(r)) > len(self.names) - scheme.size:
            raise LockLost(f"lock {key!r} is no longer ours on a quorum of nodes", key=key)
        errors = self.errors(replies)
        raise LockUnavailable.for_key(key, attempts=1, errors=errors, reason="could not extend on a quorum")

    def release(self, key: str, owner: str, *, notify: bool = True, limit: int = 1) -> Plan[tuple[bool, list[Reply]]]:
        """Delete ``owner``'s lock or permit where it still holds it; whether a quorum confirmed, and the replies."""
        scheme = self.scheme(limit)
        replies = yield self.broadcast(scheme.release(key, owner=owner, notify=notify), scripts.done, scheme.size)
        if sum(1 for r in replies if scripts.done(r)) >= scheme.size:
            return True, replies
        errors = self.errors(replies)
        if errors:
            logger.warning("releasing %r: %d node(s) failed: %s", key, len(errors), errors)
        return False, replies
