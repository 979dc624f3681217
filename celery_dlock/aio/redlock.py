"""AsyncRedlock: the Redlock lock of :mod:`celery_dlock.lock`, taken from asyncio.

It makes the decisions of :class:`~celery_dlock.lock.plans.Rules`, the very
ones the sync :class:`~celery_dlock.lock.redlock.Redlock` makes, with the same
keys, scripts and tokens, so a sync and an async holder of one key exclude
each other.  Only the I/O differs (:mod:`celery_dlock.aio.transport`).

>>> redlock = AsyncRedlock(["redis://127.0.0.1:6379/0"])   # doctest: +SKIP
>>> async with redlock.lock("ledger:42", ttl=30) as lock:  # doctest: +SKIP
...     await write_balance(account=42, fence=lock.token)

Cancelling :meth:`AsyncRedlock.acquire` undoes the attempt on every node
before the cancellation goes on; see ``docs/asyncio.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict, TypeVar

from ..lock.keyspace import DEFAULT_PREFIX, Keyspace
from ..lock.metadata import holder_metadata
from ..lock.plans import Plan, Rules, new_owner
from ..lock.redlock import PRELOAD, Redlock
from ..lock.validation import (
    check_acquire,
    check_int,
    check_manager_options,
)
from ..lock.waiting import Retries
from .lock import AsyncLock, AsyncLostCallback, Holding
from .node import AsyncNode, NodeSpec
from .transport import background, drive, fan
from .watchdog import loop_watchdog

__all__ = ["AsyncRedlock", "LockOptions"]

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")


class LockOptions(TypedDict, total=False):
    """The options :meth:`AsyncRedlock.lock` passes on to :meth:`AsyncRedlock.acquire`."""

    blocking: bool
    timeout: float | None
    on_lost: AsyncLostCallback | None
    max_hold: float | None
    label: str | None
    limit: int


class AsyncRedlock:
    """A lock manager over one or more independent Redis masters, for asyncio.

    ``nodes`` are Redis URLs (``redis://``, ``rediss://``, ``unix://``) or
    :class:`redis.asyncio.Redis` clients whose settings are reused, one per
    independent master; Sentinel and Cluster nodes are the sync
    :class:`~celery_dlock.lock.redlock.Redlock`'s only.  The options mean what
    they mean there.  Connections are made per event loop, on first use.
    """

    DEFAULT_RETRY_COUNT: ClassVar[int] = Redlock.DEFAULT_RETRY_COUNT
    DEFAULT_RETRY_DELAY: ClassVar[float] = Redlock.DEFAULT_RETRY_DELAY
    DEFAULT_RETRY_JITTER: ClassVar[float] = Redlock.DEFAULT_RETRY_JITTER
    DEFAULT_SOCKET_TIMEOUT: ClassVar[float] = Redlock.DEFAULT_SOCKET_TIMEOUT

    def __init__(
        self,
        nodes: NodeSpec | Sequence[NodeSpec],
        *,
        retry_count: int = DEFAULT_RETRY_COUNT,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        retry_jitter: float = DEFAULT_RETRY_JITTER,
        drift_factor: float = 0.01,
        key_prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        extend_every: float = 1 / 3,
    ) -> None:
        specs: Sequence[object] = (
            [nodes] if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Sequence) else nodes
        )
        if not specs:
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
        self.nodes = [AsyncNode(spec, socket_timeout=socket_timeout, preload=PRELOAD) for spec in specs]  # type: ignore[arg-type]
        identities = [node.identity for node in self.nodes]
        twice = next((n.name for i, n in enumerate(self.nodes) if n.identity in identities[:i]), None)
        if twice is not None:
            raise ValueError(f"nodes: {twice} is given twice; Redlock needs independent masters")
        #: How many nodes must agree: a strict majority.
        self.quorum = len(self.nodes) // 2 + 1
        self.retry_count, self.retry_delay, self.retry_jitter = retry_count, retry_delay, retry_jitter
        self.socket_timeout = socket_timeout
        self.extend_every = extend_every
        #: The names of every Redis key and channel this manager uses (the sync client's own).
        self.keyspace = Keyspace(key_prefix)
        #: The algorithm's decisions, shared with the sync :class:`~celery_dlock.lock.redlock.Redlock`.
        self.rules = Rules([n.name for n in self.nodes], self.keyspace, drift_factor=drift_factor)

    def quorum_for(self, limit: int) -> int:
        """How many nodes must grant one permit of a semaphore of ``limit`` (``⌊N·limit/(limit+1)⌋ + 1``)."""
        return self.rules.scheme(check_int("limit", limit, minimum=1)).size

    def __repr__(self) -> str:
        return f"<AsyncRedlock {len(self.nodes)} node(s), quorum {self.quorum}>"

    async def acquire(
        self,
        key: str,
        ttl: float,
        *,
        blocking: bool = True,
        timeout: float | None = None,
        auto_extend: bool = False,
        on_lost: AsyncLostCallback | None = None,
        max_hold: float | None = None,
        label: str | None = None,
        owner_prefix: str = "",
        details: Mapping[str, Any] | None = None,
        limit: int = 1,
    ) -> AsyncLock:
        """Take the lock on ``key`` for a lease of ``ttl`` seconds, or one of its ``limit`` permits.

        The options are :meth:`Redlock.acquire`'s; ``limit=N`` makes the key
        a semaphore, its permits shared with sync holders of the same limit.

        Raises :class:`LockBusy` if the key stayed held and
        :class:`LockUnavailable` if a quorum could not be reached.  If the
        caller is cancelled, the attempt is undone on every node (and waited
        for) before the cancellation goes on.
        """
        ttl = check_acquire(key, ttl, timeout, max_hold, on_lost, label, owner_prefix, limit)
        owner = new_owner(owner_prefix)
        meta = holder_metadata(label, details)
        retries = Retries(self.retry_count, self.retry_delay, self.retry_jitter, timeout=timeout, blocking=blocking)
        try:
            token, valid_until = await self._run(self.rules.acquire(key, owner, ttl, meta, retries, limit=limit))
        except asyncio.CancelledError:
            undo = self.rules.read_all(self.rules.undo(key, owner, limit))
            await asyncio.shield(background(fan(self.nodes, undo)))
            raise
        holding = Holding(label=label, on_lost=on_lost, max_hold=max_hold, meta=meta, limit=limit)
        lock = AsyncLock(self, key, owner, ttl, (token, valid_until), holding)
        if auto_extend:
            loop_watchdog().watch(lock, self.extend_every)
        return lock

    @asynccontextmanager
    async def lock(
        self, key: str, ttl: float, *, auto_extend: bool = True, **options: Unpack[LockOptions]
    ) -> AsyncIterator[AsyncLock]:
        """Hold the lock on ``key`` for the ``async with`` block, then release it, even when cancelled.

        ``options`` are :meth:`acquire`'s (:class:`LockOptions`); auto-extension is on by default.
        """
        held = await self.acquire(key, ttl, auto_extend=auto_extend, **options)
        try:
            yield held
        finally:
            await held.release()

    async def close(self) -> None:
        """Close this event loop's connections to every node."""
        for node in self.nodes:
            await node.close()

    # -- the lease of a held lock (the AsyncLeaseManager of AsyncLock) -----------

    async def renew_lease(
        self, key: str, owner: str, ttl: float, *, token: int = 0, meta: str = "", limit: int = 1
    ) -> float:
        """Renew ``owner``'s lease (or permit) on a quorum, repairing nodes that lost it; when it stops being valid."""
        return await self._run(self.rules.renew(key, owner, ttl, token=token, meta=meta, limit=limit))

    async def release_lease(self, key: str, owner: str, *, limit: int = 1) -> bool:
        """Delete the lock (or permit) wherever ``owner`` still holds it; True if a quorum confirmed."""
        released, _ = await self._run(self.rules.release(key, owner, limit=limit))
        return released

    def forget(self, lock: AsyncLock) -> None:
        """Stop auto-extending ``lock``."""
        loop_watchdog().forget(lock)

    async def _run(self, plan: Plan[T]) -> T:
        return await drive(plan, self.nodes)
