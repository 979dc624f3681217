"""Reading and clearing the locks of a Celery app, behind ``celery dlock``.

Plain functions that return result objects and know nothing of click, so
that they can be tested and reused (in a health endpoint, say, or a deploy
script); :mod:`celery_dlock.ops.cli` only formats them.

* :func:`held_locks` and :func:`lock_details` read the locks, with SCAN
  and never KEYS.  A lock's owner value is never exposed, only whether the
  lock is a handoff reservation for a parked ticket.
* :func:`force_release` deletes locks whoever holds them, then hands their
  parked messages on so that none is stranded.  With ``dlock_history`` on,
  each forced release goes into its key's history with the operator who ran
  it (:func:`operator`).
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import redis
from celery import Celery
from redis.exceptions import RedisError

from ..celery.app_state import AppLocks, locks_for
from ..celery.handoffs import hand_on_stranded
from ..lock.errors import LockUnavailable
from ..lock.handoff import Handoff
from ..lock.keyspace import RESERVED_OWNER, Keyspace
from ..lock.metadata import parse_lock, parse_metadata

__all__ = [
    "OPERATOR_TIMEOUT",
    "HeldLock",
    "ParkedTicket",
    "Released",
    "connected",
    "force_release",
    "held_locks",
    "lock_details",
    "operator",
    "parked_by_task",
    "parked_tickets",
    "permit_holders",
]

#: Seconds an operator command waits for one node to connect or answer.
OPERATOR_TIMEOUT: Final = 2.0


# -- inspection ------------------------------------------------------------------


@dataclass(frozen=True)
class HeldLock:
    """A held lock as the nodes store it, without its secret owner value."""

    #: The key, without the prefix.
    key: str
    #: The fencing token: the highest any node holding the lock stores.
    token: int
    #: Seconds left on the lease (the smallest over the nodes), or ``None``
    #: if the key has no expiry.
    ttl_left: float | None
    #: Seconds since it was acquired, by this machine's clock and the
    #: holder's ``acquired_at``; ``None`` when the holder did not record it.
    held_for: float | None
    #: The host and process id of the holder.
    hostname: str | None
    pid: int | None
    #: The holder's label: for a task, its task id.
    task_id: str | None
    #: The holder's task name, when it is known (see ``celery dlock list``).
    task: str | None
    #: For a handoff reservation, the parked ticket it is reserved for.
    reserved_for: str | None
    #: How many nodes hold it for the same owner, out of ``of_nodes``.
    nodes: int
    of_nodes: int
    #: The metadata exactly as the holder stored it.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``queue`` for a publish-time queue lock (``scope="queue"``, ``"queue+run"``, ``"life"``), else ``run``."""
        return "queue" if self.meta.get("kind") == "queue" else "run"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, with :attr:`kind`."""
        return {**asdict(self), "kind": self.kind}


@dataclass(frozen=True)
class ParkedTicket:
    """A message parked in a key's handoff queue."""

    ticket: str
    #: The task name its message carries, or ``None`` if it cannot be read.
    task: str | None


@dataclass(frozen=True)
class _Stored:
    """One node's copy of a lock."""

    owner: str
    token: int
    pttl_ms: int
    meta: dict[str, Any]
    parked_task: str | None


def held_locks(app: Celery, pattern: str = "*", *, timeout: float = OPERATOR_TIMEOUT) -> list[HeldLock]:
    """Every lock held on ``app``'s nodes whose key matches the glob ``pattern``.

    Nodes that do not answer are left out; :class:`LockUnavailable` is raised
    only when none answers.  Sorted by key.
    """
    locks = locks_for(app)
    space = locks.redlock.keyspace
    return _gather(locks, lambda client: _scan_keys(client, space, pattern), timeout)


def lock_details(app: Celery, key: str, *, timeout: float = OPERATOR_TIMEOUT) -> HeldLock | None:
    """The lock on ``key``, or ``None`` if no node holds it."""
    found = _gather(locks_for(app), lambda client: [key], timeout)
    return found[0] if found else None


def permit_holders(app: Celery, key: str) -> list[dict[str, Any]]:
    """The holders of ``key``'s semaphore permits (tasks with ``limit`` above 1), oldest first.

    Each is the holder's metadata (``label`` is the task id, ``task`` its
    name) with its fencing ``token`` and ``ttl``, the seconds its lease has left.
    """
    return locks_for(app).redlock.permit_holders(key)


def parked_tickets(app: Celery, key: str, *, timeout: float = OPERATOR_TIMEOUT) -> list[ParkedTicket]:
    """The tickets parked on ``key``, oldest first, with their task names.

    Handoff queues exist only with a single lock node; with several this is
    always empty.
    """
    locks = locks_for(app)
    if len(locks.settings.redis_url) != 1:
        return []
    tickets = locks.handoff_queue.queued(key)
    payloads = locks.handoff_queue.parked_payloads(key, tickets)
    return [ParkedTicket(ticket, _task_of(payload)) for ticket, payload in zip(tickets, payloads, strict=True)]


def parked_by_task(app: Celery) -> dict[str, int]:
    """How many messages are parked in handoff queues, by task name (``-`` if unreadable)."""
    locks = locks_for(app)
    if len(locks.settings.redis_url) != 1:
        return {}
    counts: Counter[str] = Counter()
    for key in locks.handoff_queue.queued_keys():
        counts.update(parked.task or "-" for parked in parked_tickets(app, key))
    return dict(counts)


def _gather(locks: AppLocks, keys_of: Callable[[redis.Redis], Iterable[str]], timeout: float) -> list[HeldLock]:
    """Read the locks named by ``keys_of`` on every node and merge the copies."""
    copies: dict[str, list[_Stored]] = {}
    errors: list[tuple[str, BaseException]] = []
    with connected(locks, timeout) as nodes:
        for name, client in nodes:
            try:
                for key in keys_of(client):
                    stored = _read_lock(client, locks.redlock.keyspace, key)
                    if stored is not None:
                        copies.setdefault(key, []).append(stored)
            except RedisError as exc:
                errors.append((name, exc))
    if len(errors) == len(locks.settings.redis_url):
        detail = "; ".join(f"{name}: {exc}" for name, exc in errors)
        raise LockUnavailable(f"no lock node answered ({detail})", errors=errors)
    total = len(locks.settings.redis_url)
    return [_merge(key, stored, total) for key, stored in sorted(copies.items())]


def _scan_keys(client: redis.Redis, space: Keyspace, pattern: str) -> Iterator[str]:
    for raw in client.scan_iter(match=space.lock_pattern(pattern), count=1000):
        yield space.key_of_lock(raw)


def _read_lock(client: redis.Redis, space: Keyspace, key: str) -> _Stored | None:
    full_key = space.lock(key)
    pipe = client.pipeline(transaction=False)
    pipe.get(full_key)
    pipe.pttl(full_key)
    value, pttl = pipe.execute()
    stored = parse_lock(value)
    if stored is None:
        return None
    parked_task = None
    if stored.owner.startswith(RESERVED_OWNER):
        parked_task = _task_of(client.hget(space.parked(key), stored.owner[len(RESERVED_OWNER) :]))
    return _Stored(stored.owner, stored.token, int(pttl), stored.meta, parked_task)


def _merge(key: str, copies: Sequence[_Stored], of_nodes: int) -> HeldLock:
    first = copies[0]
    same = [copy for copy in copies if copy.owner == first.owner]
    meta = first.meta
    ttls = [copy.pttl_ms for copy in same if copy.pttl_ms >= 0]
    acquired_at = meta.get("acquired_at")
    reserved = first.owner[len(RESERVED_OWNER) :] if first.owner.startswith(RESERVED_OWNER) else None
    return HeldLock(
        key=key,
        token=max(copy.token for copy in same),
        ttl_left=min(ttls) / 1000 if ttls else None,
        held_for=time.time() - acquired_at if isinstance(acquired_at, (int, float)) else None,
        hostname=meta.get("hostname"),
        pid=meta.get("pid"),
        task_id=meta.get("label") or reserved,
        task=meta.get("task") or first.parked_task,
        reserved_for=reserved,
        nodes=len(same),
        of_nodes=of_nodes,
        meta=meta,
    )


def _task_of(payload: bytes | str | None) -> str | None:
    """The task name in a parked message (a signature as JSON)."""
    task = (parse_metadata(payload) or {}).get("task")
    return task if isinstance(task, str) else None


@contextmanager
def connected(locks: AppLocks, timeout: float) -> Iterator[list[tuple[str, Any]]]:
    """One client per node, named without its password, closed on exit.

    Each is made from the node's own connection settings (see
    :meth:`~celery_dlock.lock.nodes.Node.client`), so a Sentinel-managed
    master is found through its Sentinels; they fail fast, with no retries,
    like the lock's own connections.
    """
    clients = [(node.name, node.client(timeout)) for node in locks.redlock.nodes]
    try:
        yield clients
    finally:
        for _, client in clients:
            client.close()


# -- forced release --------------------------------------------------------------


@dataclass(frozen=True)
class Released:
    """What :func:`force_release` did."""

    #: Each released key, with the holder metadata it had.
    removed: dict[str, dict[str, Any]]
    #: Parked messages handed on (published to the broker) afterwards.
    handoffs: list[Handoff]


def force_release(app: Celery, keys: Iterable[str], *, command: str = "release") -> Released:
    """Delete the locks on ``keys`` whoever holds them, then hand on their queues.

    The holders, if still running, are no longer protected.  When a released
    key had parked messages (possible with a single lock node only), the
    queues whose lock is gone are swept and their next messages published,
    as the worker's periodic sweep would do a few seconds later.  Each
    release is recorded in its key's history (``dlock_history``) as
    ``forced``, with the ``command`` and the :func:`operator`.
    """
    locks = locks_for(app)
    keys = list(keys)
    queued = len(locks.settings.redis_url) == 1 and any(locks.handoff_queue.queued(key) for key in keys)
    removed = {}
    by = operator()
    for key in keys:
        holder = locks.redlock.force_release(key)
        if holder is not None:
            removed[key] = holder
            locks.history.record(
                key,
                "forced",
                by=by,
                command=command,
                token=holder.get("token"),
                task=holder.get("task"),
                task_id=holder.get("label"),
            )
    locks.history.flush(wait=True)
    return Released(removed, hand_on_stranded(app) if queued else [])


def operator() -> str:
    """Who runs this process, as ``user@host``, for the history of a forced release."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER: a bare container
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"
