"""Redlock: a lease-based lock over one Redis node or a quorum of them.

This module knows nothing of Celery.  It follows the published Redlock
algorithm, with three additions: every lock carries a fencing token, a lost
lock is reported instead of discovered, and blocked acquirers are woken by the
holder's release instead of polling alone.

>>> redlock = Redlock(["redis://127.0.0.1:6379/0"])       # doctest: +SKIP
>>> with redlock.lock("ledger:42", ttl=30) as lock:       # doctest: +SKIP
...     write_balance(account=42, fence=lock.token)

The quorum is ``len(nodes) // 2 + 1``.  An acquisition that cannot reach a
quorum raises :class:`~celery_dlock.lock.errors.LockUnavailable`; one that reached a
quorum but found the key held raises :class:`~celery_dlock.lock.errors.LockBusy`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Final, TypeVar

import redis

from . import driver, permit_scripts, queue_scripts, scripts
from .addresses import refuse_async
from .cluster import ClusterNode, member
from .counters import Tally, parse_counts
from .errors import LockBusy, LockUnavailable
from .faults import fault_point
from .keyspace import DEFAULT_PREFIX, Keyspace
from .lease import Lock, LostCallback
from .member import Member
from .metadata import holder_metadata, quorum_holder
from .plans import Plan, Rules, new_owner
from .quorum import Quorum
from .resend import Resender
from .resp import pack
from .schemes import Scheme
from .validation import (
    check_acquire,
    check_int,
    check_key,
    check_manager_options,
    check_number,
    check_owner_prefix,
    check_text,
)
from .waiting import Retries
from .watchdog import Watchdog, default_watchdog

__all__ = ["Lock", "LostCallback", "Redlock"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The Lua sources every node connection loads when it connects.
PRELOAD: Final = tuple(script.source for script in (*scripts.ALL, *permit_scripts.ALL, *queue_scripts.ALL))


class Redlock:
    """A lock manager over one or more independent Redis masters.

    Arguments:
        nodes: Redis URLs or :class:`redis.Redis` clients, one per independent
            master (not replicas of one another).  A single URL or client is
            accepted as one node.  ``sentinel://h1:26379;sentinel://h2:26379/0``
            is one master found through its Sentinels, and found again after
            a failover; ``redis+cluster://h1:7000,h2:7001`` is one Redis
            Cluster, each key on the master of its slot.
        retry_count: When ``acquire`` blocks with no ``timeout``, how many
            times it retries after the first attempt.
        retry_delay: Seconds between attempts; a release on the key wakes a
            waiter earlier.
        retry_jitter: Up to this many seconds, chosen at random, are added to
            each delay so that waiters do not move in lockstep.
        drift_factor: The share of the ttl allowed for clock drift between the
            nodes; the lock's validity is ``ttl - elapsed - drift``.
        key_prefix: Prepended to every Redis key and channel the lock uses
            (see :class:`~celery_dlock.lock.keyspace.Keyspace`).
        socket_timeout: Seconds to wait for any one node to connect or
            answer.  Keep it small: a node that is slower than this counts
            against the quorum.
        extend_every: With auto-extension, renew once this share of the ttl
            has passed.
        watchdog: The renewal thread to use; by default the process's one.
        sentinel_master: The master name the Sentinels of a ``sentinel://``
            node watch.
        sentinel_kwargs: Connection options for the Sentinels themselves,
            such as their password.
        flush_every: Counters (:meth:`count`) are kept in the process and
            written at most this many seconds after the event; 0 writes each
            one at once.

    """

    DEFAULT_RETRY_COUNT: ClassVar[int] = 10
    DEFAULT_RETRY_DELAY: ClassVar[float] = 0.2
    DEFAULT_RETRY_JITTER: ClassVar[float] = 0.1
    DEFAULT_SOCKET_TIMEOUT: ClassVar[float] = 0.25
    DEFAULT_FLUSH_EVERY: ClassVar[float] = 1.0

    def __init__(
        self,
        nodes: str | redis.Redis | Sequence[str | redis.Redis],
        *,
        retry_count: int = DEFAULT_RETRY_COUNT,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        retry_jitter: float = DEFAULT_RETRY_JITTER,
        drift_factor: float = 0.01,
        key_prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        extend_every: float = 1 / 3,
        watchdog: Watchdog | None = None,
        sentinel_master: str | None = None,
        sentinel_kwargs: Mapping[str, Any] | None = None,
        flush_every: float = DEFAULT_FLUSH_EVERY,
    ) -> None:
        refuse_async(nodes)
        if isinstance(nodes, (str, redis.Redis)):
            nodes = [nodes]
        if not isinstance(nodes, Sequence):
            raise TypeError(f"nodes: expected a sequence of Redis URLs or clients, got {type(nodes).__name__}")
        if not nodes:
            raise ValueError("nodes: at least one Redis node is required")
        check_manager_options(
            retry_count=retry_count,
            retry_delay=retry_delay,
            retry_jitter=retry_jitter,
            drift_factor=drift_factor,
            socket_timeout=socket_timeout,
            extend_every=extend_every,
            key_prefix=key_prefix,
        )
        check_number("flush_every", flush_every, minimum=0)

        self.nodes: list[Member] = [
            member(spec, socket_timeout=socket_timeout, preload=PRELOAD, sentinel=(sentinel_master, sentinel_kwargs))
            for spec in nodes
        ]
        seen: dict[tuple[str, ...], Member] = {}
        for node in self.nodes:
            if node.identity in seen:
                raise ValueError(f"nodes: {node.name} is given twice; Redlock needs independent masters")
            seen[node.identity] = node
        self._quorum = Quorum(self.nodes, socket_timeout=socket_timeout)
        #: How many nodes must agree on a lock: a strict majority (semaphores need more: :meth:`quorum_for`).
        self.quorum = self._quorum.size
        self.retry_count = retry_count
        self.retry_delay = retry_delay
        self.retry_jitter = retry_jitter
        self.drift_factor = drift_factor
        self.key_prefix = key_prefix
        #: The names of every Redis key and channel this manager uses.
        self.keyspace = Keyspace(key_prefix, clustered=any(isinstance(node, ClusterNode) for node in self.nodes))
        #: The algorithm's decisions, shared with :class:`celery_dlock.aio.AsyncRedlock`.
        self.rules = Rules([node.name for node in self.nodes], self.keyspace, drift_factor=drift_factor)
        self.socket_timeout = socket_timeout
        self.extend_every = extend_every
        self._watchdog = watchdog
        # The watchdog is looked up at each call: after a fork it is a new one.
        later = lambda delay, job: self.watchdog.call_later(delay, job)  # noqa: E731, PLW0108
        self.tally = Tally(
            lambda counts: self._quorum.send_all(scripts.add_counts_call(self.keyspace, counts)),
            flush_every=flush_every,
            schedule=later,
        )
        self._resender = Resender(self._quorum, later)
        self._quorums: dict[int, Quorum] = {1: self._quorum}

    def __repr__(self) -> str:
        return f"<Redlock {len(self.nodes)} node(s), quorum {self.quorum}>"

    def quorum_for(self, limit: int) -> int:
        """How many nodes must grant one permit of a semaphore of ``limit``: ``⌊N·limit/(limit+1)⌋ + 1``."""
        return self.scheme(check_int("limit", limit, minimum=1)).size

    def scheme(self, limit: int = 1) -> Scheme:
        """The scripts and quorum size of keys admitting ``limit`` holders (made once per limit)."""
        return self.rules.scheme(limit)

    def quorum_of(self, limit: int = 1) -> Quorum:
        """The nodes, of which a quorum for ``limit`` holders must agree (made once per limit)."""
        found = self._quorums.get(limit)
        if found is None:
            found = self._quorums[limit] = Quorum(self.nodes, socket_timeout=self.socket_timeout, limit=limit)
        return found

    @property
    def watchdog(self) -> Watchdog:
        """The renewal thread of auto-extended locks: the one given, else the process's."""
        return self._watchdog if self._watchdog is not None else default_watchdog()

    # -- public API ----------------------------------------------------------

    def acquire(
        self,
        key: str,
        ttl: float,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        auto_extend: bool = False,
        on_lost: LostCallback | None = None,
        max_hold: float | None = None,
        label: str | None = None,
        owner_prefix: str = "",
        count_as: str | None = None,
        details: Mapping[str, Any] | None = None,
        limit: int = 1,
    ) -> Lock:
        """Take the lock on ``key`` for a lease of ``ttl`` seconds, or one of its ``limit`` permits.

        With ``blocking=False`` one attempt is made.  Otherwise it waits,
        woken early by the holder's release: until ``timeout`` seconds have
        passed if given, else for up to ``retry_count`` retries.

        With ``auto_extend=True`` the process's watchdog renews the lease until
        release (or for at most ``max_hold`` seconds) and calls ``on_lost`` if
        renewal fails.  ``label`` is stored with the lock for operators.
        ``owner_prefix`` starts the lock's owner value, so that a supervisor
        that knows it can free the lock of a holder that died
        (:meth:`release_owner`); the rest stays 128 random bits.
        ``count_as`` counts this lock's acquisitions, busy refusals and
        releases under that label, inside the lock scripts (see :meth:`stats`).
        ``details`` adds JSON-serialisable fields to the stored metadata.

        With ``limit=N`` the key is a semaphore: up to N holders at once,
        each with its own permit, owner value and fencing token, renewed and
        released like a lock.  A permit needs ``quorum_for(N)`` nodes, more
        than a majority once N > 1 (``docs/guarantees.md``).  Use one limit
        per key: a plain lock on the key blocks its permits, not the reverse.

        Raises :class:`LockBusy` if the key stayed held, and
        :class:`LockUnavailable` if a quorum could not be reached.
        """
        ttl = check_acquire(key, ttl, timeout, max_hold, on_lost, label, owner_prefix, limit)
        if count_as is not None:
            check_text("count_as", count_as)

        owner = new_owner(owner_prefix)
        meta = holder_metadata(label, details)
        retries = Retries(self.retry_count, self.retry_delay, self.retry_jitter, timeout=timeout, blocking=blocking)
        on_busy = (lambda: self.count(count_as, "busy")) if count_as else None
        plan = self.rules.acquire(key, owner, ttl, meta, retries, on_busy=on_busy, limit=limit)
        token, valid_until = self._run(plan)
        watchdog = self.watchdog if auto_extend else None
        lock = Lock(
            self,
            key,
            owner,
            token,
            ttl,
            valid_until,
            label=label,
            on_lost=on_lost,
            max_hold=max_hold,
            count_as=count_as,
            watchdog=watchdog,
            meta=meta,
            limit=limit,
        )
        if watchdog is not None:
            watchdog.watch(lock, self.extend_every)
        if count_as:
            self.count(count_as, "acquired")
        fault_point("after-acquire")
        return lock

    @contextmanager
    def lock(
        self,
        key: str,
        ttl: float,
        *,
        auto_extend: bool = True,
        blocking: bool = True,
        timeout: float | None = None,
        on_lost: LostCallback | None = None,
        max_hold: float | None = None,
        label: str | None = None,
        limit: int = 1,
    ) -> Iterator[Lock]:
        """Hold the lock on ``key`` for the ``with`` block, then release it.

        It is released on exit whether or not the block raised.  Arguments are
        as for :meth:`acquire`, except that auto-extension is on by default.
        """
        held = self.acquire(
            key,
            ttl,
            blocking=blocking,
            timeout=timeout,
            auto_extend=auto_extend,
            on_lost=on_lost,
            max_hold=max_hold,
            label=label,
            limit=limit,
        )
        try:
            yield held
        finally:
            held.release()

    def release_owner(self, key: str, owner_prefix: str, *, limit: int = 1) -> bool:
        """Release ``key`` (its permits, for a ``limit`` above 1) if its owner value starts with ``owner_prefix``.

        For supervisors: a process that started a holder with a known
        ``owner_prefix`` frees the lock once that holder is known to be dead,
        instead of waiting out the lease.  Returns True when a quorum released.
        """
        check_key(key)
        check_owner_prefix(owner_prefix, required=True)
        quorum = self.quorum_of(limit)
        command = self.scheme(limit).release_prefix(key, prefix=owner_prefix)
        return quorum.agreeing(quorum.broadcast(command, granted=scripts.done), scripts.done)

    def force_release(self, key: str) -> dict[str, Any] | None:
        """Delete ``key``'s lock whoever holds it; returns the holder it had.

        For operators clearing a stuck lock: it skips the owner check, so the
        holder, if still running, is no longer protected.  Blocked waiters are
        woken.  Returns ``None`` if no node held the key.
        """
        held = self.holder(key)
        replies = self._quorum.read_all(scripts.force_release_call(self.keyspace, key))
        removed = sum(1 for r in replies if scripts.done(r))
        logger.warning("forced release of lock %r (held by %s) on %d node(s)", key, held, removed)
        return held if removed else None

    def holder(self, key: str) -> dict[str, Any] | None:
        """The metadata and token of whoever holds ``key`` on a quorum, if anyone.

        For operators and diagnostics: it reads every node and takes no lock.
        A holder found on fewer than a quorum of nodes (a lock being taken, or
        one left on a minority) is not reported.
        """
        check_key(key)
        return quorum_holder(self._quorum.read_all(pack("GET", self.keyspace.lock(key))), self.quorum)

    def permit_holders(self, key: str) -> list[dict[str, Any]]:
        """The holders of ``key``'s semaphore permits found on a majority of nodes, oldest first.

        For operators: each is the holder's metadata with its ``token`` and
        ``ttl`` (seconds left on the node that has the least).  Like
        :meth:`holder`, it reads every node and takes nothing.
        """
        check_key(key)
        replies = self._quorum.read_all(permit_scripts.list_permits_call(self.keyspace, key))
        return permit_scripts.quorum_permits(replies, self.quorum)

    def count(self, label: str, event: str, amount: int = 1) -> None:
        """Add to the counter ``<label>:<event>``, written to every node at most ``flush_every`` s later."""
        self.tally.add(label, event, amount)

    def flush_counts(self) -> None:
        """Write this process's pending counts to every node now, without waiting for replies."""
        self.tally.flush()

    def stats(self) -> dict[str, dict[str, int]]:
        """The counters by label, from the first node that answers (each counts the same events).

        This process's pending counts are written first; other processes' arrive within ``flush_every``.
        """
        self.tally.flush()
        for node in self.nodes:
            reply = node.execute(pack("HGETALL", self.keyspace.stats))
            if isinstance(reply, BaseException):
                continue
            return parse_counts(self.keyspace, reply)
        raise LockUnavailable.for_key(None, attempts=1, reason="no node answered for the counters")

    def close(self) -> None:
        """Close the calling thread's connections to every node."""
        for node in self.nodes:
            node.close()

    # -- the lease of a held lock (the LeaseManager of lease.Lock) ----------------

    def _run(self, plan: Plan[T]) -> T:
        return driver.run(plan, self.nodes, timeout=self.socket_timeout)

    def lease_end(self, started: float, ttl: float) -> float:
        """When a lease of ``ttl`` granted after ``started`` stops being safe to rely on (monotonic)."""
        return self.rules.lease_end(started, ttl)

    def renew_lease(self, key: str, owner: str, ttl: float, *, token: int = 0, meta: str = "", limit: int = 1) -> float:
        """Renew ``owner``'s lease (its permit, for a ``limit`` above 1) on a quorum; returns its new end.

        Nodes found without the lock (restarted empty, say) get it back, with
        ``token`` and ``meta`` and only the validity left, once a quorum has
        renewed it.  Raises :class:`LockLost` when a quorum no longer holds
        it for ``owner``, and :class:`LockUnavailable` when too few answered.
        """
        return self._run(self.rules.renew(key, owner, ttl, token=token, meta=meta, limit=limit))

    def release_lease(self, key: str, owner: str, *, wait: bool = True, notify: bool = True, limit: int = 1) -> bool:
        """Delete the lock wherever ``owner`` still holds it.

        Returns True when a quorum confirmed.  With ``wait=False`` it sends
        to every node and returns False at once: the replies are skipped on
        the next call.  ``notify=False`` wakes no waiter: for cleaning up a
        failed attempt, which a waiter would otherwise take for a release and
        retry at once, again and again.  ``limit`` is the key's, as acquired.
        """
        command = self.scheme(limit).release(key, owner=owner, notify=notify)
        if not wait:
            self._resender.resend_unreached(command, self.nodes, self._quorum.send_all(command))
            return False
        released, replies = self._run(self.rules.release(key, owner, notify=notify, limit=limit))
        self._resender.resend_unreached(command, self.nodes, replies)
        return released

    # -- one attempt -----------------------------------------------------------

    def attempt(
        self,
        key: str,
        owner: str,
        ttl: float,
        meta: str,
        attempt: int,
        count_as: str | None = None,
        *,
        limit: int = 1,
    ) -> tuple[int, float] | LockBusy | LockUnavailable:
        """Try once for ``owner``.  Returns ``(token, valid_until)`` or the error to raise.

        The low-level step of :meth:`acquire`, which checks the arguments;
        ``meta`` is the holder metadata, ``attempt`` the attempt's number,
        ``limit`` the number of holders the key admits.
        """
        outcome = self._run(self.rules.attempt(key, owner, ttl, meta, attempt, limit=limit))
        if count_as and isinstance(outcome, LockBusy):
            self.count(count_as, "busy")
        return outcome
