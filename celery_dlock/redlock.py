"""Redlock: a lease-based lock over one Redis node or a quorum of them.

This module knows nothing of Celery.  It follows the published Redlock
algorithm, with three additions: every lock carries a fencing token, a lost
lock is reported instead of discovered, and blocked acquirers are woken by the
holder's release instead of polling alone.

>>> redlock = Redlock(["redis://127.0.0.1:6379/0"])       # doctest: +SKIP
>>> with redlock.lock("ledger:42", ttl=30) as lock:       # doctest: +SKIP
...     write_balance(account=42, fence=lock.token)

The quorum is ``len(nodes) // 2 + 1``.  An acquisition that cannot reach a
quorum raises :class:`~celery_dlock.errors.LockUnavailable`; one that reached a
quorum but found the key held raises :class:`~celery_dlock.errors.LockBusy`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, ClassVar, Final

import redis
from redis.exceptions import RedisError

from . import scripts
from .errors import DLockError, LockBusy, LockLost, LockUnavailable
from .faults import fault_point
from .nodes import NO_REPLY, Node, Reply, fan_out, pack
from .watchdog import Watchdog, default_watchdog

__all__ = ["Lock", "LostCallback", "Redlock"]

logger = logging.getLogger(__name__)

#: Called from the watchdog thread when an auto-extended lock is lost.
LostCallback = Callable[["Lock", DLockError], None]

#: Redis counts leases in whole milliseconds.
_MIN_TTL: Final = 0.001

#: Redlock's allowance for clock drift beyond ``drift_factor``: 2 ms.
_DRIFT_FLOOR: Final = 0.002


class Lock:
    """A held lock: its key, fencing token and lease.

    Made by :meth:`Redlock.acquire`; not constructed directly.  It is a
    context manager that releases on exit.  ``release()`` and ``extend()``
    check that the lock is still ours on each node, so they never touch a
    lock that has since passed to another owner.
    """

    def __init__(
        self,
        redlock: Redlock,
        key: str,
        owner: str,
        token: int,
        ttl: float,
        valid_until: float,
        *,
        label: str | None = None,
        on_lost: LostCallback | None = None,
        max_hold: float | None = None,
        count_as: str | None = None,
    ) -> None:
        #: The key as the caller gave it, without the prefix.
        self.key = key
        #: The fencing token: strictly greater than every earlier holder's.
        self.token = token
        #: The lease in seconds, renewed in full by each extension.
        self.ttl = ttl
        #: The caller's label (a Celery task id, say), stored in the metadata.
        self.label = label
        #: Called from the watchdog thread if an auto-extended lock is lost.
        self.on_lost = on_lost
        #: Stop auto-extending once the lock has been held this many seconds.
        self.max_hold = max_hold
        #: The label its events are counted under, if counted.
        self.count_as = count_as
        #: How many times the lease has been extended.
        self.extensions = 0
        #: When the lock was acquired, on the monotonic clock.
        self.acquired_at = time.monotonic()
        self._redlock = redlock
        self._owner = owner
        self._valid_until = valid_until
        self._released = False
        self._lost = False
        self._mutex = threading.Lock()
        self._watchdog: Watchdog | None = None

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost else f"{self.remaining():.3f}s left"
        return f"<Lock {self.key!r} token={self.token} {state}>"

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @property
    def owner(self) -> str:
        """The random value that identifies this holder on every node."""
        return self._owner

    @property
    def released(self) -> bool:
        """Whether :meth:`release` has been called."""
        return self._released

    @property
    def lost(self) -> bool:
        """True once the lease lapsed or an extension failed.

        A lost lock may already belong to someone else: stop writing, or fence
        writes with :attr:`token`.
        """
        if self._lost:
            return True
        return not self._released and time.monotonic() >= self._valid_until

    def remaining(self) -> float:
        """Seconds of validity left, on the monotonic clock (0 once released)."""
        if self._released:
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` if the lock is lost; call before a write."""
        if self.lost:
            raise LockLost(f"lock {self.key!r} (token {self.token}) is lost", key=self.key)

    def extend(self, ttl: float | None = None) -> None:
        """Renew the lease to ``ttl`` seconds (by default the original ttl).

        Raises :class:`LockLost` if the lock is no longer ours on a quorum, or
        :class:`LockUnavailable` if a quorum could not be reached; either way
        the lock is then marked :attr:`lost`.
        """
        try:
            self._extend(ttl)
        except DLockError:
            self._lost = True
            raise

    def release(self) -> bool:
        """Release the lock on every node where it is still ours.

        Idempotent: later calls do nothing and return False.  Returns True
        when a quorum confirmed that the lock was still ours; False means it had
        been lost, or too few nodes answered (it then expires with its lease).
        It never raises for node errors, so it is safe in ``finally`` blocks.
        """
        return self._end(confirm=True)

    def release_nowait(self) -> None:
        """Release the lock without waiting for the nodes to confirm.

        The release is sent to every node at once and its replies are read
        later, with the connection's next command, so it costs no round trip.
        For callers that would not act on :meth:`release`'s answer.
        """
        self._end(confirm=False)

    def _end(self, *, confirm: bool) -> bool:
        with self._mutex:
            if self._released:
                return False
            if time.monotonic() >= self._valid_until:
                self._lost = True
            self._released = True
            if self._watchdog is not None:
                self._watchdog.forget(self)
            fault_point("before-release")
            return self._release_io(confirm)

    unlock = release

    def keep(self, seconds: float) -> bool:
        """Keep the lock for ``seconds`` more, then let it expire on its own.

        Renewal stops and :meth:`release` becomes a no-op: for work that must
        not run again until a period is over, even though it has finished.
        Returns False, having released nothing, if the lock was already lost.
        """
        seconds = _check_ttl(seconds)
        with self._mutex:
            if self._released:
                return False
            self._released = True
            try:
                self._redlock._extend(self.key, self._owner, seconds)
            except DLockError:
                self._lost = True
                return False
            return True

    def _release_io(self, confirm: bool) -> bool:
        """Delete the lock on the nodes; subclasses may also hand it on."""
        nodes = None if confirm else self._redlock.nodes
        return self._redlock._release(self.key, self._owner, nodes, count_as=self.count_as)

    def _extend(self, ttl: float | None) -> None:
        with self._mutex:
            if self._released:
                raise LockLost(f"lock {self.key!r} was released", key=self.key)
            if self.lost:
                raise LockLost(f"lock {self.key!r} lapsed before it was extended", key=self.key)
            ttl = self.ttl if ttl is None else _check_ttl(ttl)
            valid_until = self._redlock._extend(self.key, self._owner, ttl)
            fault_point("mid-extend")  # the nodes renewed; this process has not yet seen it
            self._valid_until = valid_until
            self.ttl = ttl
            self.extensions += 1

    def _mark_lost(self, error: DLockError) -> None:
        """Record the loss and tell the callback; called by the watchdog."""
        self._lost = True
        logger.warning("lock %r (token %s) lost: %s", self.key, self.token, error)
        if self.on_lost is not None:
            try:
                self.on_lost(self, error)
            except Exception:
                logger.exception("on_lost callback for lock %r raised", self.key)


class Redlock:
    """A lock manager over one or more independent Redis masters.

    Arguments:
        nodes: Redis URLs or :class:`redis.Redis` clients, one per independent
            master (not replicas of one another).  A single URL or client is
            accepted as one node.
        retry_count: When ``acquire`` blocks with no ``timeout``, how many
            times it retries after the first attempt.
        retry_delay: Seconds between attempts; a release on the key wakes a
            waiter earlier.
        retry_jitter: Up to this many seconds, chosen at random, are added to
            each delay so that waiters do not move in lockstep.
        drift_factor: The share of the ttl allowed for clock drift between the
            nodes; the lock's validity is ``ttl - elapsed - drift``.
        key_prefix: Prepended to every Redis key and channel the lock uses.
        socket_timeout: Seconds to wait for any one node to connect or
            answer.  Keep it small: a node that is slower than this counts
            against the quorum.
        extend_every: With auto-extension, renew once this share of the ttl
            has passed.
        watchdog: The renewal thread to use; by default the process's one.

    Redis keys used, with the default prefix:

    * ``dlock:lock:<key>``: a hash (``owner``, ``token``, ``meta``) living
      as long as the lease;
    * ``dlock:fence``: the node's fencing counter, which never expires;
    * channel ``dlock:released:<key>``: published on each release.

    """

    DEFAULT_RETRY_COUNT: ClassVar[int] = 10
    DEFAULT_RETRY_DELAY: ClassVar[float] = 0.2
    DEFAULT_RETRY_JITTER: ClassVar[float] = 0.1
    DEFAULT_SOCKET_TIMEOUT: ClassVar[float] = 0.25

    def __init__(
        self,
        nodes: str | redis.Redis | Sequence[str | redis.Redis],
        *,
        retry_count: int = DEFAULT_RETRY_COUNT,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        retry_jitter: float = DEFAULT_RETRY_JITTER,
        drift_factor: float = 0.01,
        key_prefix: str = "dlock:",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        extend_every: float = 1 / 3,
        watchdog: Watchdog | None = None,
    ) -> None:
        if isinstance(nodes, (str, redis.Redis)):
            nodes = [nodes]
        if not isinstance(nodes, Sequence):
            raise TypeError(f"nodes: expected a sequence of Redis URLs or clients, got {type(nodes).__name__}")
        if not nodes:
            raise ValueError("nodes: at least one Redis node is required")
        _check_options(retry_count, retry_delay, retry_jitter, drift_factor, socket_timeout, extend_every)
        _check_text("key_prefix", key_prefix)

        self.nodes = [Node(spec, socket_timeout=socket_timeout) for spec in nodes]
        seen: dict[tuple[str, ...], Node] = {}
        for node in self.nodes:
            if node.identity in seen:
                raise ValueError(f"nodes: {node.name} is given twice; Redlock needs independent masters")
            seen[node.identity] = node
        #: How many nodes must agree: a strict majority.
        self.quorum = len(self.nodes) // 2 + 1
        self.retry_count = retry_count
        self.retry_delay = retry_delay
        self.retry_jitter = retry_jitter
        self.drift_factor = drift_factor
        self.key_prefix = key_prefix
        self.socket_timeout = socket_timeout
        self.extend_every = extend_every
        self._watchdog = watchdog
        self._fence_key = f"{key_prefix}fence"
        self._stats_key = f"{key_prefix}stats"

    def __repr__(self) -> str:
        return f"<Redlock {len(self.nodes)} node(s), quorum {self.quorum}>"

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
    ) -> Lock:
        """Take the lock on ``key`` for a lease of ``ttl`` seconds.

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

        Raises :class:`LockBusy` if the key stayed held, and
        :class:`LockUnavailable` if a quorum could not be reached.
        """
        _check_key(key)
        ttl = _check_ttl(ttl)
        _check_acquire_options(timeout, max_hold, on_lost, label, owner_prefix, count_as)

        owner = owner_prefix + secrets.token_hex(16)
        meta = _metadata(label, details)
        deadline = None if timeout is None else time.monotonic() + timeout
        attempts = 0
        waiter: _ReleaseWaiter | None = None
        try:
            while True:
                attempts += 1
                outcome = self._attempt(key, owner, ttl, meta, attempts, count_as)
                if isinstance(outcome, tuple):
                    token, valid_until = outcome
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
                    )
                    if auto_extend:
                        self._watchdog_for_process().watch(lock, self.extend_every)
                    fault_point("after-acquire")
                    return lock
                now = time.monotonic()
                out_of_time = now >= deadline if deadline is not None else attempts > self.retry_count
                if not blocking or out_of_time:
                    raise outcome
                delay = self.retry_delay + random.uniform(0, self.retry_jitter)
                if deadline is not None:
                    delay = min(delay, deadline - now)
                if isinstance(outcome, LockBusy):
                    if waiter is None:
                        # Listen first, then look again, so a release between
                        # the attempt and the subscription is not missed.
                        waiter = self._subscribe(key)
                        if waiter is not None:
                            continue
                    if outcome.retry_after is not None:
                        delay = min(delay, outcome.retry_after)
                if waiter is not None:
                    waiter.wait(delay)
                else:
                    time.sleep(delay)
        finally:
            if waiter is not None:
                waiter.close()

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
        )
        try:
            yield held
        finally:
            held.release()

    def release_owner(self, key: str, owner_prefix: str) -> bool:
        """Release ``key`` if its owner value starts with ``owner_prefix``.

        For supervisors: a process that started a holder with a known
        ``owner_prefix`` frees the lock once that holder is known to be dead,
        instead of waiting out the lease.  Returns True when a quorum released.
        """
        _check_key(key)
        if not isinstance(owner_prefix, str) or not owner_prefix:
            raise ValueError("owner_prefix: must be a non-empty str")
        command = pack(
            "EVALSHA",
            scripts.RELEASE_PREFIX.sha,
            1,
            self._lock_key(key),
            owner_prefix,
            self._channel(key),
        )
        replies = self._broadcast(command, granted=lambda r: r == 1)
        return sum(1 for r in replies if r == 1) >= self.quorum

    def force_release(self, key: str) -> dict[str, Any] | None:
        """Delete ``key``'s lock whoever holds it; returns the holder it had.

        For operators clearing a stuck lock: it skips the owner check, so the
        holder, if still running, is no longer protected.  Blocked waiters are
        woken.  Returns ``None`` if no node held the key.
        """
        held = self.holder(key)
        command = pack("EVALSHA", scripts.FORCE_RELEASE.sha, 1, self._lock_key(key), self._channel(key))
        replies = fan_out(
            [(node, command) for node in self.nodes], decided=lambda r: False, timeout=self.socket_timeout
        )
        removed = sum(1 for r in replies if r == 1)
        logger.warning("forced release of lock %r (held by %s) on %d node(s)", key, held, removed)
        return held if removed else None

    def holder(self, key: str) -> dict[str, Any] | None:
        """The metadata and token of whoever holds ``key`` on a quorum, if anyone.

        For operators and diagnostics: it reads every node and takes no lock.
        A holder found on fewer than a quorum of nodes (a lock being taken, or
        one left on a minority) is not reported.
        """
        _check_key(key)
        command = pack("HGETALL", self._lock_key(key))
        replies = fan_out(
            [(node, command) for node in self.nodes], decided=lambda r: False, timeout=self.socket_timeout
        )
        copies: dict[bytes, list[dict[bytes, bytes]]] = {}
        for reply in replies:
            if isinstance(reply, list) and reply:
                fields = dict(zip(reply[::2], reply[1::2], strict=True))
                copies.setdefault(fields.get(b"owner", b""), []).append(fields)
        for held in copies.values():
            if len(held) >= self.quorum:
                holder = _parse_metadata(held[0].get(b"meta")) or {}
                holder["token"] = max(int(fields.get(b"token", 0)) for fields in held)
                return holder
        return None

    def count(self, label: str, event: str, amount: int = 1) -> None:
        """Add to the counter ``<label>:<event>`` on every node, without waiting.

        For events the lock scripts cannot see (a requeue, a skip, a loss):
        the command is sent and its reply skipped later, so it costs no round
        trip.
        """
        command = pack("HINCRBY", self._stats_key, f"{label}:{event}", amount)
        fan_out([(node, command) for node in self.nodes], decided=lambda replies: True, timeout=0)

    def stats(self) -> dict[str, dict[str, int]]:
        """The counters by label, read from the first node that answers.

        Every node counts the same events, so one node is enough.
        """
        for node in self.nodes:
            reply = node.execute(pack("HGETALL", self._stats_key))
            if isinstance(reply, BaseException):
                continue
            counters: dict[str, dict[str, int]] = {}
            for field, value in zip(reply[::2], reply[1::2], strict=True):
                label, _, event = field.decode().rpartition(":")
                counters.setdefault(label, {})[event] = int(value)
            return counters
        raise LockUnavailable.for_key(None, attempts=1, reason="no node answered for the counters")

    def close(self) -> None:
        """Close the calling thread's connections to every node."""
        for node in self.nodes:
            node.close()

    # -- one attempt -----------------------------------------------------------

    def _attempt(
        self, key: str, owner: str, ttl: float, meta: str, attempt: int, count_as: str | None = None
    ) -> tuple[int, float] | LockBusy | LockUnavailable:
        """Try once.  Returns ``(token, valid_until)`` or the error to raise."""
        ttl_ms = math.ceil(ttl * 1000)
        started = time.monotonic()
        if count_as is None:
            command = pack(
                "EVALSHA",
                scripts.ACQUIRE.sha,
                2,
                self._lock_key(key),
                self._fence_key,
                owner,
                ttl_ms,
                meta,
            )
        else:
            command = pack(
                "EVALSHA",
                scripts.ACQUIRE.sha,
                3,
                self._lock_key(key),
                self._fence_key,
                self._stats_key,
                owner,
                ttl_ms,
                meta,
                count_as,
            )
        replies = self._broadcast(command, granted=_is_granted)
        tokens = {i: int(r[1]) for i, r in enumerate(replies) if _is_granted(r)}

        if len(tokens) >= self.quorum:
            token = max(tokens.values())
            if self._fence(token, tokens):
                valid_until = self._valid_until(started, ttl)
                if time.monotonic() < valid_until:
                    return token, valid_until
                reason = "the lease ran out while acquiring"
            else:
                reason = "the fencing token could not be stored on a quorum"
            self._release(key, owner, self.nodes, notify=False)
            return LockUnavailable.for_key(key, attempts=attempt, errors=self._errors(replies), reason=reason)

        busy = [r for r in replies if _is_refused(r)]
        maybe_ours = [node for node, r in zip(self.nodes, replies, strict=True) if not _is_refused(r)]
        if maybe_ours:
            self._release(key, owner, maybe_ours, notify=False)
        if len(tokens) + len(busy) < self.quorum:
            return LockUnavailable.for_key(key, attempts=attempt, errors=self._errors(replies))
        holder = next((_parse_metadata(r[1]) for r in busy if r[1]), None)
        retry_after = max(int(r[2]) for r in busy) / 1000 if busy else None
        return LockBusy.for_key(key, attempts=attempt, holder=holder, retry_after=retry_after)

    def _fence(self, token: int, tokens: dict[int, int]) -> bool:
        """Make sure a quorum's counters are at least ``token``.

        Tokens must rise across holders even when their quorums differ; that
        holds once every token was written to a quorum before it was handed
        out, since any later quorum then meets one of those nodes.  Usually the
        granting nodes already agree and no write is needed.
        """
        at_token = sum(1 for t in tokens.values() if t == token)
        if at_token >= self.quorum:
            return True
        behind = [i for i, t in tokens.items() if t < token]
        command = pack("EVALSHA", scripts.FENCE_FLOOR.sha, 1, self._fence_key, token)
        replies = fan_out(
            [(self.nodes[i], command) for i in behind],
            decided=lambda r: at_token + sum(1 for x in r if isinstance(x, int)) >= self.quorum,
            timeout=self.socket_timeout,
        )
        return at_token + sum(1 for r in replies if isinstance(r, int)) >= self.quorum

    # -- extend and release ----------------------------------------------------

    def _extend(self, key: str, owner: str, ttl: float) -> float:
        """Renew the lease on a quorum; returns the new ``valid_until``."""
        started = time.monotonic()
        command = pack("EVALSHA", scripts.EXTEND.sha, 1, self._lock_key(key), owner, math.ceil(ttl * 1000))
        replies = self._broadcast(command, granted=lambda r: r == 1)
        extended = sum(1 for r in replies if r == 1)
        valid_until = self._valid_until(started, ttl)
        if extended >= self.quorum and time.monotonic() < valid_until:
            return valid_until
        if sum(1 for r in replies if r == 0) > len(self.nodes) - self.quorum:
            raise LockLost(f"lock {key!r} is no longer ours on a quorum of nodes", key=key)
        raise LockUnavailable.for_key(
            key, attempts=1, errors=self._errors(replies), reason="could not extend on a quorum"
        )

    def _release(
        self,
        key: str,
        owner: str,
        nodes: Sequence[Node] | None = None,
        *,
        notify: bool = True,
        count_as: str | None = None,
    ) -> bool:
        """Delete the lock wherever ``owner`` still holds it.

        Returns True when a quorum confirmed.  With ``nodes`` given it sends to
        those nodes only and does not wait: their replies are skipped on the
        next call.  ``notify=False`` wakes no waiter: for cleaning up a failed
        attempt, which a waiter would otherwise take for a release and retry
        at once, again and again.
        """
        channel = self._channel(key) if notify else ""
        if count_as is None:
            command = pack("EVALSHA", scripts.RELEASE.sha, 1, self._lock_key(key), owner, channel)
        else:
            command = pack(
                "EVALSHA", scripts.RELEASE.sha, 2, self._lock_key(key), self._stats_key, owner, channel, count_as
            )
        if nodes is not None:
            fan_out([(node, command) for node in nodes], decided=lambda r: True, timeout=0)
            return False
        replies = self._broadcast(command, granted=lambda r: r == 1)
        if sum(1 for r in replies if r == 1) >= self.quorum:
            return True
        errors = self._errors(replies)
        if errors:
            logger.warning("releasing %r: %d node(s) failed: %s", key, len(errors), errors)
        return False

    # -- helpers -----------------------------------------------------------------

    def _broadcast(self, command: bytes, *, granted: Callable[[Reply], bool]) -> list[Reply]:
        return fan_out(
            [(node, command) for node in self.nodes],
            decided=lambda replies: _decided(replies, granted, self.quorum, len(self.nodes)),
            timeout=self.socket_timeout,
        )

    def _subscribe(self, key: str) -> _ReleaseWaiter | None:
        channel = self._channel(key)
        for node in self.nodes:
            try:
                return _ReleaseWaiter(node, channel)
            except (RedisError, OSError) as exc:
                logger.debug("cannot listen for releases on %s: %r", node.name, exc)
        return None

    def _watchdog_for_process(self) -> Watchdog:
        return self._watchdog if self._watchdog is not None else default_watchdog()

    def _errors(self, replies: list[Reply]) -> list[tuple[str, BaseException]]:
        return [
            (node.name, reply)
            for node, reply in zip(self.nodes, replies, strict=True)
            if isinstance(reply, BaseException)
        ]

    def _valid_until(self, started: float, ttl: float) -> float:
        """When a lease of ``ttl`` granted after ``started`` stops being safe to rely on."""
        return started + ttl - (ttl * self.drift_factor + _DRIFT_FLOOR)

    def _lock_key(self, key: str) -> str:
        return f"{self.key_prefix}lock:{key}"

    def _channel(self, key: str) -> str:
        return f"{self.key_prefix}released:{key}"


class _ReleaseWaiter:
    """A subscription to a key's release channel on one node."""

    def __init__(self, node: Node, channel: str) -> None:
        self._conn = node.new_connection()
        try:
            self._conn.send_packed_command([pack("SUBSCRIBE", channel)], check_health=False)
            self._conn.read_response()
        except BaseException:
            self._conn.disconnect()
            raise

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a release; True if one came."""
        try:
            if self._conn.can_read(timeout):
                self._conn.read_response()
                return True
        except (RedisError, OSError):
            time.sleep(timeout)
        return False

    def close(self) -> None:
        """Drop the subscription's connection."""
        self._conn.disconnect()


def _decided(replies: list[Reply], yes: Callable[[Reply], bool], quorum: int, total: int) -> bool:
    """Whether enough replies are in for the outcome to be known."""
    granted = sum(1 for r in replies if yes(r))
    failed = sum(1 for r in replies if r is not NO_REPLY and not yes(r))
    return granted >= quorum or failed > total - quorum


def _is_granted(reply: Reply) -> bool:
    return isinstance(reply, list) and reply[0] == 1


def _is_refused(reply: Reply) -> bool:
    return isinstance(reply, list) and reply[0] == 0


_HOST: Final = socket.gethostname()


def _metadata(label: str | None, details: Mapping[str, Any] | None = None) -> str:
    meta = {"hostname": _HOST, "pid": os.getpid(), "acquired_at": time.time(), "label": label}
    if details:
        meta.update(details)
    return json.dumps(meta)


def _parse_metadata(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _check_options(
    retry_count: object,
    retry_delay: object,
    retry_jitter: object,
    drift_factor: object,
    socket_timeout: object,
    extend_every: object,
) -> None:
    """Check :class:`Redlock`'s numeric options, naming the first one that is wrong."""
    _check_int("retry_count", retry_count, minimum=0)
    _check_number("retry_delay", retry_delay, minimum=0)
    _check_number("retry_jitter", retry_jitter, minimum=0)
    _check_number("drift_factor", drift_factor, minimum=0, below=1)
    _check_number("socket_timeout", socket_timeout, minimum=0, exclusive=True)
    _check_number("extend_every", extend_every, minimum=0, exclusive=True, below=1)


def _check_acquire_options(
    timeout: object,
    max_hold: object,
    on_lost: object,
    label: object,
    owner_prefix: object,
    count_as: object,
) -> None:
    """Check :meth:`Redlock.acquire`'s optional arguments, naming the one that is wrong."""
    if timeout is not None:
        _check_number("timeout", timeout, minimum=0)
    if max_hold is not None:
        _check_number("max_hold", max_hold, minimum=0, exclusive=True)
    if on_lost is not None and not callable(on_lost):
        raise TypeError("on_lost: expected a callable")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label: expected str, got {type(label).__name__}")
    _check_text("owner_prefix", owner_prefix)
    if count_as is not None:
        _check_text("count_as", count_as)


def _check_text(name: str, value: object) -> None:
    """A str that Redis can be sent: encodable as UTF-8 (it may be empty)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name}: not encodable as UTF-8: {exc}") from None


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key: expected str, got {type(key).__name__}")
    if not key:
        raise ValueError("key: must not be empty")
    try:
        key.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"key: not encodable as UTF-8: {exc}") from None


def _check_ttl(ttl: object) -> float:
    _check_number("ttl", ttl, minimum=_MIN_TTL)
    return float(ttl)  # type: ignore[arg-type]


def _check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    exclusive: bool = False,
    below: float | None = None,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise ValueError(f"{name}: must be {bound}, got {value!r}")
    if below is not None and value >= below:
        raise ValueError(f"{name}: must be < {below}, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
