"""Health checks behind ``celery dlock doctor``.

:func:`diagnose` runs them all: the settings, then for every node its
reachability, topology, persistence and eviction policy, then every single-flight
task's settings against the rules of :mod:`celery_dlock.celery.checks`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis
from celery import Celery
from redis.cluster import RedisCluster
from redis.exceptions import RedisError
from redis.sentinel import SentinelConnectionPool

from ..celery.app_state import AppLocks, locks_for
from ..celery.checks import lease, task_problems
from ..celery.guard import guard_of
from ..celery.options import Policy
from ..celery.settings import Settings, broker_visibility_timeout, lock_address, unknown_settings
from .inspect import OPERATOR_TIMEOUT, connected

__all__ = [
    "Check",
    "Verdict",
    "check_eviction",
    "check_node",
    "check_persistence",
    "check_settings",
    "check_task",
    "check_tasks",
    "check_topology",
    "check_unknown_settings",
    "diagnose",
    "worst",
]


# -- health checks ---------------------------------------------------------------


class Verdict(str, Enum):
    """How a check came out, from best to worst."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """The outcome of one health check."""

    #: What was checked: ``settings``, ``node``, ``topology``, ``persistence``,
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


def diagnose(app: Celery, *, timeout: float = OPERATOR_TIMEOUT) -> list[Check]:
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
    longest = max([locks.settings.default_ttl, *(lease(policy) for policy in policies.values())])
    checks = [check_settings(locks.settings, lock_address(app.conf).source), *check_unknown_settings(app.conf)]
    with connected(locks, timeout) as clients:
        for name, client in clients:
            checks.extend(check_node(name, client, locks.settings, longest))
    checks.extend(check_tasks(app, locks.settings, policies))
    return checks


def check_settings(settings: Settings, source: str = "dlock_redis_url") -> Check:
    """Where the lock address came from, and the node count: an even count over one is a WARN.

    ``source`` is the setting the address was taken from (see
    :func:`~celery_dlock.celery.settings.lock_address`).
    """
    count = len(settings.redis_url)
    quorum = count // 2 + 1
    origin = "set in dlock_redis_url" if source == "dlock_redis_url" else f"derived from {source}"
    summary = f"lock address {origin}: {count} node(s), quorum {quorum}, key prefix {settings.key_prefix!r}"
    if count > 1 and count % 2 == 0:
        return Check(
            "settings",
            Verdict.WARN,
            f"{summary}: {count} nodes tolerate {count - quorum} failure(s), as {count - 1} would; "
            "an odd count tolerates as many failures with one node less",
        )
    return Check("settings", Verdict.OK, summary)


def check_unknown_settings(conf: Any) -> list[Check]:
    """A WARN for each ``dlock_`` key that is not a setting (a typo is otherwise silently ignored)."""
    return [
        Check(
            "settings",
            Verdict.WARN,
            f"{key} is not a dlock setting and is ignored" + (f"; did you mean {meant}?" if meant else ""),
        )
        for key, meant in unknown_settings(conf)
    ]


def check_node(name: str, client: redis.Redis | RedisCluster, settings: Settings, longest_lease: float) -> list[Check]:
    """Reachability, then topology, persistence and eviction policy, of one node (of each master of a Cluster)."""
    if isinstance(client, RedisCluster):
        return check_cluster(name, client, settings, longest_lease)
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
    return [
        reach,
        check_topology(name, client),
        check_persistence(name, client, longest_lease),
        check_eviction(name, client),
    ]


def check_cluster(name: str, client: RedisCluster, settings: Settings, longest_lease: float) -> list[Check]:
    """A Redis Cluster: its state and masters (a WARN: failovers are asynchronous), then each master as a node."""
    try:
        state = client.cluster_info().get("cluster_state")
        masters = client.get_primaries()  # type: ignore[no-untyped-call]
        replicas = len(client.get_replicas())  # type: ignore[no-untyped-call]
    except RedisError as exc:
        return [Check("node", Verdict.FAIL, f"unreachable: {exc}", name)]
    if state != "ok":
        return [Check("topology", Verdict.FAIL, f"cluster_state is {state}: some slots are not served", name)]
    checks = [
        Check(
            "topology",
            Verdict.WARN,
            f"Redis Cluster of {len(masters)} masters with {replicas} replica(s): replication is asynchronous, "
            "so a failover of a slot's master can forget a granted lock and grant it again (see "
            "docs/guarantees.md, 'no node forgets a lock')",
            name,
        )
    ]
    for master in masters:
        where = f"{name} master {master.host}:{master.port}"
        node_checks = check_node(where, master.redis_connection, settings, longest_lease)
        checks += [check for check in node_checks if check.name != "topology"]
    return checks


def check_topology(name: str, client: redis.Redis) -> Check:
    """What the node is: a standalone master (OK), a Sentinel-managed one (WARN), or a replica (FAIL).

    ``ROLE`` tells a master from a replica and counts the replicas; the
    client's Sentinel pool, if it has one, names the master and where the
    Sentinels say it is.
    """
    try:
        role = client.execute_command("ROLE")  # type: ignore[no-untyped-call]
        sentinel = _sentinel_master(client)
    except RedisError as exc:
        return Check("topology", Verdict.WARN, f"cannot read ROLE ({exc}); check it by hand", name)
    if _text(role[0]) != "master":
        where = f"{_text(role[1])}:{role[2]}" if len(role) > 2 else "?"
        return Check("topology", Verdict.FAIL, f"a replica of {where}: it refuses the lock's writes", name)
    replicas = f"{len(role[2])} replica(s)"
    if sentinel is None:
        return Check("topology", Verdict.OK, f"standalone master with {replicas}", name)
    master, address = sentinel
    return Check(
        "topology",
        Verdict.WARN,
        f"Sentinel master {master} at {address} with {replicas}: replication is asynchronous, so a "
        "failover can forget a granted lock and grant it again (with a higher token, so fencing refuses "
        "the stale holder; see "
        "docs/guarantees.md, 'no node forgets a lock')",
        name,
    )


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


def check_tasks(app: Celery, settings: Settings, policies: dict[str, Policy]) -> list[Check]:
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
    problems = [
        (Verdict.FAIL if problem.fatal else Verdict.WARN, problem.text)
        for problem in task_problems(policy, settings, visibility)
    ]
    if not problems:
        return Check("task", Verdict.OK, found, name)
    verdict = _worst(verdict for verdict, _ in problems)
    return Check("task", verdict, f"{found}: " + "; ".join(text for _, text in problems), name)


def _policies(app: Celery, locks: AppLocks) -> dict[str, Policy]:
    """The policy in force for each single-flight task of ``app``, by name."""
    policies = {}
    for task in list(app.tasks.values()):
        guard = guard_of(task)
        if guard is not None:
            policies[task.name] = guard.policy(locks)
    return policies


def _sentinel_master(client: redis.Redis) -> tuple[str, str] | None:
    """The master's name and ``host:port`` for a client of a Sentinel-managed master, else ``None``."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return None
    host, port = pool.get_master_address()  # type: ignore[no-untyped-call]
    return str(pool.service_name), f"{_text(host)}:{port}"


def _config(client: redis.Redis, param: str) -> str:
    # One parameter per CONFIG GET: Redis before 7 takes only one.
    return _text(next(iter(client.config_get(param).values()), "?"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unreadable(name: str, subject: str, exc: RedisError) -> Check:
    return Check(name, Verdict.WARN, f"cannot read the config ({exc}); check it by hand", subject)
