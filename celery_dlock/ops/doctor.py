"""Operator tooling behind ``celery dlock``: inspect, force-release, diagnose.

Plain functions over a Celery app's lock state that return result objects and
know nothing of click, so that they can be tested and reused (in a health
endpoint, say, or a deploy script); :mod:`celery_dlock.ops.cli` only formats them.

* :func:`held_locks` and :func:`lock_details` read the lock hashes, with SCAN
  and never KEYS.  A lock's owner value is never exposed, only whether the
  lock is a handoff reservation for a parked ticket.
* :func:`force_release` deletes locks whoever holds them, then hands their
  parked messages on so that none is stranded.
* :func:`diagnose` runs the health checks: the settings, and for every node
  its reachability, persistence and eviction policy, and every single-flight
  task's timings against the Redis broker's visibility timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from ..celery.settings import Settings, broker_visibility_timeout
from ..lock.errors import LockUnavailable
from ..lock.handoff import Handoff
from ..celery.options import Policy
from ..celery.app_state import AppLocks, locks_for
from ..celery.signals import guard_of, hand_on_stranded

__all__ = [
    "OPERATOR_TIMEOUT",
    "Check",
    "HeldLock",
    "ParkedTicket",
    "Released",
    "Verdict",
    "diagnose",
    "force_release",
    "held_locks",
    "lock_details",
    "parked_tickets",
    "worst",
]

#: Seconds an operator command waits for one node to connect or answer.
OPERATOR_TIMEOUT: Final = 2.0

#: The owner value of a lock reserved for a parked ticket starts with this.
_RESERVED: Final = "park:"


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

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


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


def held_locks(app: Any, pattern: str = "*", *, timeout: float = OPERATOR_TIMEOUT) -> list[HeldLock]:
    """Every lock held on ``app``'s nodes whose key matches the glob ``pattern``.

    Nodes that do not answer are left out; :class:`LockUnavailable` is raised
    only when none answers.  Sorted by key.
    """
    locks = locks_for(app)
    match = f"{glob_escape(locks.settings.key_prefix)}lock:{pattern}"
    return _gather(locks, lambda client: _scan_keys(client, locks.settings.key_prefix, match), timeout)


def lock_details(app: Any, key: str, *, timeout: float = OPERATOR_TIMEOUT) -> HeldLock | None:
    """The lock on ``key``, or ``None`` if no node holds it."""
    found = _gather(locks_for(app), lambda client: [key], timeout)
    return found[0] if found else None


def parked_tickets(app: Any, key: str, *, timeout: float = OPERATOR_TIMEOUT) -> list[ParkedTicket]:
    """The tickets parked on ``key``, oldest first, with their task names.

    Handoff queues exist only with a single lock node; with several this is
    always empty.
    """
    locks = locks_for(app)
    if len(locks.settings.redis_url) != 1:
        return []
    tickets = locks.handoff_queue.queued(key)
    if not tickets:
        return []
    with _connected(locks, timeout) as [(_, client)]:
        payloads = client.hmget(_parked_hash(locks.settings, key), tickets)
    return [ParkedTicket(ticket, _task_of(payload)) for ticket, payload in zip(tickets, payloads, strict=True)]


def glob_escape(text: str) -> str:
    """``text`` with Redis glob characters escaped, to match it literally."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def _gather(locks: AppLocks, keys_of: Callable[[redis.Redis], Iterable[str]], timeout: float) -> list[HeldLock]:
    """Read the locks named by ``keys_of`` on every node and merge the copies."""
    copies: dict[str, list[_Stored]] = {}
    errors: list[tuple[str, BaseException]] = []
    with _connected(locks, timeout) as nodes:
        for name, client in nodes:
            try:
                for key in keys_of(client):
                    stored = _read_lock(client, locks.settings, key)
                    if stored is not None:
                        copies.setdefault(key, []).append(stored)
            except RedisError as exc:
                errors.append((name, exc))
    if len(errors) == len(locks.settings.redis_url):
        detail = "; ".join(f"{name}: {exc}" for name, exc in errors)
        raise LockUnavailable(f"no lock node answered ({detail})", errors=errors)
    total = len(locks.settings.redis_url)
    return [_merge(key, stored, total) for key, stored in sorted(copies.items())]


def _scan_keys(client: redis.Redis, prefix: str, match: str) -> Iterator[str]:
    skip = len(f"{prefix}lock:".encode())
    for raw in client.scan_iter(match=match, count=1000):
        yield raw[skip:].decode()


def _read_lock(client: redis.Redis, settings: Settings, key: str) -> _Stored | None:
    full_key = f"{settings.key_prefix}lock:{key}"
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(full_key)
    pipe.pttl(full_key)
    fields, pttl = pipe.execute()
    if not fields:
        return None
    owner = fields.get(b"owner", b"").decode(errors="replace")
    parked_task = None
    if owner.startswith(_RESERVED):
        parked_task = _task_of(client.hget(_parked_hash(settings, key), owner[len(_RESERVED) :]))
    return _Stored(owner, int(fields.get(b"token", 0)), int(pttl), _parse_meta(fields.get(b"meta")), parked_task)


def _merge(key: str, copies: Sequence[_Stored], of_nodes: int) -> HeldLock:
    first = copies[0]
    same = [copy for copy in copies if copy.owner == first.owner]
    meta = first.meta
    ttls = [copy.pttl_ms for copy in same if copy.pttl_ms >= 0]
    acquired_at = meta.get("acquired_at")
    reserved = first.owner[len(_RESERVED) :] if first.owner.startswith(_RESERVED) else None
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


def _parse_meta(raw: bytes | str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _task_of(payload: bytes | str | None) -> str | None:
    """The task name in a parked message (a signature as JSON)."""
    task = _parse_meta(payload).get("task")
    return task if isinstance(task, str) else None


def _parked_hash(settings: Settings, key: str) -> str:
    return f"{settings.key_prefix}parked:{key}"


@contextmanager
def _connected(locks: AppLocks, timeout: float) -> Iterator[list[tuple[str, redis.Redis]]]:
    """One plain client per node, named without its password, closed on exit.

    They fail fast, with no retries, like the lock's own connections.
    """
    clients = [
        (
            node.name,
            redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
            ),
        )
        for node, url in zip(locks.redlock.nodes, locks.settings.redis_url, strict=True)
    ]
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


def force_release(app: Any, keys: Iterable[str]) -> Released:
    """Delete the locks on ``keys`` whoever holds them, then hand on their queues.

    The holders, if still running, are no longer protected.  When a released
    key had parked messages (possible with a single lock node only), the
    queues whose lock is gone are swept and their next messages published,
    as the worker's periodic sweep would do a few seconds later.
    """
    locks = locks_for(app)
    keys = list(keys)
    queued = len(locks.settings.redis_url) == 1 and any(locks.handoff_queue.queued(key) for key in keys)
    removed = {}
    for key in keys:
        holder = locks.redlock.force_release(key)
        if holder is not None:
            removed[key] = holder
    return Released(removed, hand_on_stranded(app) if queued else [])


# -- health checks ---------------------------------------------------------------


class Verdict(str, Enum):
    """How a check came out, from best to worst."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """The outcome of one health check."""

    #: What was checked: ``settings``, ``node``, ``persistence``,
    #: ``eviction`` or ``task``.
    name: str
    verdict: Verdict
    #: What was found and, unless OK, what to do about it.
    detail: str
    #: The node or task checked, if any.
    subject: str = ""

    def as_dict(self) -> dict[str, str]:
        """A JSON-ready dict of every field."""
        return {"name": self.name, "verdict": self.verdict.value, "subject": self.subject, "detail": self.detail}


def worst(checks: Iterable[Check]) -> Verdict:
    """The worst verdict among ``checks`` (OK for none)."""
    return _worst(check.verdict for check in checks)


def _worst(verdicts: Iterable[Verdict]) -> Verdict:
    order = list(Verdict)
    return max(verdicts, key=order.index, default=Verdict.OK)


def diagnose(app: Any, *, timeout: float = OPERATOR_TIMEOUT) -> list[Check]:
    """Run every health check for ``app``; see ``docs/cli.md`` for what each means.

    The app's task modules should be imported first, so that its
    single-flight tasks are registered.
    """
    try:
        locks = locks_for(app)
        locks.redlock  # noqa: B018 - builds the nodes: a node given twice or a bad URL raises
    except ValueError as exc:  # a ConfigurationError, a node given twice, a bad URL
        return [Check("settings", Verdict.FAIL, str(exc))]
    policies = _policies(app, locks)
    longest = max([locks.settings.default_ttl, *(_lease(policy) for policy in policies.values())])
    checks = [check_settings(locks.settings)]
    with _connected(locks, timeout) as clients:
        for name, client in clients:
            checks.extend(check_node(name, client, locks.settings, longest))
    checks.extend(check_tasks(app, locks.settings, policies))
    return checks


def check_settings(settings: Settings) -> Check:
    """The node count: more than one node in an even number is a WARN."""
    count = len(settings.redis_url)
    quorum = count // 2 + 1
    summary = f"{count} node(s), quorum {quorum}, key prefix {settings.key_prefix!r}"
    if count > 1 and count % 2 == 0:
        return Check(
            "settings",
            Verdict.WARN,
            f"{summary}: {count} nodes tolerate {count - quorum} failure(s), as {count - 1} would; "
            "an odd count tolerates as many failures with one node less",
        )
    return Check("settings", Verdict.OK, summary)


def check_node(name: str, client: redis.Redis, settings: Settings, longest_lease: float) -> list[Check]:
    """Reachability, then persistence and eviction policy, of one node."""
    try:
        client.ping()  # connects
        started = time.monotonic()
        client.ping()
        latency = time.monotonic() - started
        version = client.info("server").get("redis_version", "?")
    except RedisError as exc:
        return [Check("node", Verdict.FAIL, f"unreachable: {exc}", name)]
    reachable = f"reachable, redis {version}, ping {latency * 1000:.1f} ms"
    if latency > settings.socket_timeout:
        reach = Check(
            "node",
            Verdict.WARN,
            f"{reachable}: slower than dlock_socket_timeout={settings.socket_timeout}s, "
            "so lock calls would count it as failed",
            name,
        )
    else:
        reach = Check("node", Verdict.OK, reachable, name)
    return [reach, check_persistence(name, client, longest_lease), check_eviction(name, client)]


def check_persistence(name: str, client: redis.Redis, longest_lease: float) -> Check:
    """``appendfsync always`` keeps locks across a crash; anything else is a WARN."""
    try:
        conf = {param: _config(client, param) for param in ("appendonly", "appendfsync", "save")}
    except RedisError as exc:
        return _unreadable("persistence", name, exc)
    found = f"appendonly={conf['appendonly']} appendfsync={conf['appendfsync']} save={conf['save']!r}"
    if conf["appendonly"] == "yes" and conf["appendfsync"] == "always":
        return Check("persistence", Verdict.OK, f"{found}: a granted lock is on disk before it is acknowledged", name)
    return Check(
        "persistence",
        Verdict.WARN,
        f"{found}: a crash-restart can forget held locks; delay restarts past the longest "
        f"lease ({longest_lease:g}s) or set appendonly yes and appendfsync always",
        name,
    )


def check_eviction(name: str, client: redis.Redis) -> Check:
    """``maxmemory-policy noeviction`` is OK; every other policy can evict locks."""
    try:
        policy = _config(client, "maxmemory-policy")
        maxmemory = _config(client, "maxmemory")
    except RedisError as exc:
        return _unreadable("eviction", name, exc)
    found = f"maxmemory-policy={policy} maxmemory={maxmemory}"
    if policy == "noeviction":
        return Check("eviction", Verdict.OK, found, name)
    return Check(
        "eviction",
        Verdict.FAIL,
        f"{found}: under memory pressure Redis may evict held locks (they carry TTLs, so "
        "volatile-* policies evict them too); set maxmemory-policy noeviction",
        name,
    )


def check_tasks(app: Any, settings: Settings, policies: dict[str, Policy]) -> list[Check]:
    """Each single-flight task's timings and queue against the broker and nodes."""
    if not policies:
        return [Check("task", Verdict.OK, "no single-flight tasks registered (are the task modules imported?)")]
    visibility = broker_visibility_timeout(app.conf)
    return [check_task(name, policy, settings, visibility) for name, policy in sorted(policies.items())]


def check_task(name: str, policy: Policy, settings: Settings, visibility: float | None) -> Check:
    """One task: FAIL on what the worker refuses, WARN on a lease past the visibility timeout.

    Every problem found is named, in one line.
    """
    found = f"on_busy={policy.on_busy} ttl={policy.ttl:g}s requeue_max_delay={policy.requeue_max_delay:g}s"
    if visibility is None:
        found += " (the broker has no visibility timeout)"
    else:
        found += f" visibility_timeout={visibility:g}s"
    problems: list[tuple[Verdict, str]] = []
    nodes = len(settings.redis_url)
    if policy.queues and nodes != 1:
        problems.append((Verdict.FAIL, f"its queue lives on one node, but there are {nodes}"))
    if visibility is not None and policy.requeue_max_delay >= visibility:
        problems.append(
            (
                Verdict.FAIL,
                "a requeued message would be delivered twice; lower dlock_requeue_max_delay "
                "or raise broker_transport_options['visibility_timeout']",
            )
        )
    elif visibility is not None and _lease(policy) >= visibility:
        problems.append(
            (
                Verdict.WARN,
                "a message redelivered after a worker crash meets the dead run's lock, "
                "which stands until its lease ends, and is requeued or skipped meanwhile",
            )
        )
    if not problems:
        return Check("task", Verdict.OK, found, name)
    verdict = _worst(verdict for verdict, _ in problems)
    return Check("task", verdict, f"{found}: " + "; ".join(text for _, text in problems), name)


def _policies(app: Any, locks: AppLocks) -> dict[str, Policy]:
    """The policy in force for each single-flight task of ``app``, by name."""
    policies = {}
    for task in list(app.tasks.values()):
        guard = guard_of(task)
        if guard is not None:
            policies[task.name] = guard.policy(locks)
    return policies


def _lease(policy: Policy) -> float:
    """The longest a run's lock can stand after it died: its ttl, or its hold period."""
    hold = policy.hold
    if isinstance(hold, (int, float)) and not isinstance(hold, bool):
        return max(policy.ttl, float(hold))
    return policy.ttl


def _config(client: redis.Redis, param: str) -> str:
    # One parameter per CONFIG GET: Redis before 7 takes only one.
    value = next(iter(client.config_get(param).values()), "?")
    return value.decode() if isinstance(value, bytes) else str(value)


def _unreadable(name: str, subject: str, exc: RedisError) -> Check:
    return Check(name, Verdict.WARN, f"cannot read the config ({exc}); check it by hand", subject)
