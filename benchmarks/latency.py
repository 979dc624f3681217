"""Scenario 1: uncontended lock latency.

One operation is an acquire and a release of a key nobody else wants.  It is
timed for our :class:`~celery_dlock.lock.redlock.Redlock` on 1, 3 and 5 nodes and
on one Sentinel-managed master, and for the locks people would use instead,
against two references: the *floor*, the least a correct single-node lock
can send (``SET NX PX`` then a compare-and-delete script), and a *raw
fan-out* of two PING round trips over the same nodes, the cost of two round
trips to N servers on this machine whatever the client does.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from celery_dlock.lock.redlock import Redlock

from . import cpus, servers
from .harness import Op, Schedule, Variant, run_interleaved
from .optional import optional_import
from .scenario import (
    LinePlot,
    RunOptions,
    Scenario,
    ScenarioResult,
    build_result,
    medians_by_nodes,
)
from .stats import Ratio, Target

__all__ = ["FULL", "QUICK", "SCENARIO", "run"]

#: The node counts measured; smaller groups are the first nodes of the largest.
NODE_COUNTS = (1, 3, 5)

#: About 40 s on two vCPUs in the ``split`` layout; pottery takes most of it.
FULL = Schedule(rounds=360, warmup=20, batch=20)
#: Under a second: enough to show that every variant runs.
QUICK = Schedule(rounds=5, warmup=1, batch=10)

#: The lease, long enough never to lapse during an operation.
TTL_SECONDS = 10

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_PONG = b"+PONG\r\n"

METHOD = f"""\
Each operation acquires and releases one key that no one else wants, timed
on its own; the lease is {TTL_SECONDS} s.  Every acquire is non-blocking: with no
contention the first attempt succeeds, and a failure raises at once instead
of retrying.  Lock objects are made once and reused where the library allows;
ours has no such object (``acquire`` returns a new ``Lock``), so that cost is
counted.  All clients talk TCP over loopback, one connection per node; the
redis-py clients have a 1 s socket timeout and no retries, our nodes the
default 0.25 s.  The 1- and 3-node variants use the first nodes of the 5.

* **floor**: ``SET key token NX PX`` then ``EVALSHA`` of a compare-and-delete
  script, with a plain redis-py client and a fresh random token: 2 round trips.
* **ours**: ``Redlock(urls).acquire(key, ttl, blocking=False)`` then
  ``Lock.release()``: 2 fan-outs, each sent to every node before any reply is read.
* **ours via Sentinel**: the same on one ``sentinel://`` node, a master with
  one replica and three Sentinels.  The Sentinels are asked where the master
  is when a connection is made, not per operation; the master also streams
  every write to its replica.
* **ours via Cluster**: the same on one ``redis+cluster://`` node, three
  masters with a replica each; the key's slot map is read once, then each
  script goes straight to the master of the key's slot, which streams it to
  its replica.
* **redis-py Lock**: ``client.lock(name, timeout=ttl)``: 2 round trips.
* **python-redis-lock**: ``redis_lock.Lock(client, name, expire=ttl)``: 3 round
  trips (its acquire first reads the key to refuse re-acquiring a held lock).
* **pottery**: ``Redlock(key=..., masters={{...}}, auto_release_time=ttl)``:
  2 fan-outs, each through a new thread pool with one task per node.
* **raw fan-out**: PING sent on every node's socket, then every reply read;
  twice.  Not a lock: the least two round trips to N nodes can cost here.
"""


def key(family: str, nodes: int = 1) -> str:
    """The variant key of ``family`` on ``nodes`` nodes, such as ``ours-5``."""
    return f"{family}-{nodes}"


RATIOS = [
    Ratio("ours(1) / floor", key("ours"), key("floor")),
    Ratio("ours via Sentinel / ours(1)", key("ours-sentinel"), key("ours")),
    Ratio("ours via Cluster / ours(1)", key("ours-cluster"), key("ours")),
    Ratio("ours(3) / ours(1)", key("ours", 3), key("ours")),
    Ratio("ours(5) / ours(1)", key("ours", 5), key("ours")),
    Ratio("raw(3) / raw(1)", key("raw", 3), key("raw")),
    Ratio("raw(5) / raw(1)", key("raw", 5), key("raw")),
    *(Ratio(f"ours({n}) / raw({n})", key("ours", n), key("raw", n)) for n in NODE_COUNTS),
    Ratio("floor / raw(1)", key("floor"), key("raw")),
    Ratio("redis-py Lock / ours(1)", key("redis-py"), key("ours")),
    Ratio("python-redis-lock / ours(1)", key("python-redis-lock"), key("ours")),
    *(Ratio(f"pottery({n}) / ours({n})", key("pottery", n), key("ours", n)) for n in NODE_COUNTS),
]

_by_label = {ratio.label: ratio for ratio in RATIOS}

TARGETS = [
    Target("ours(1) within 15% of the floor", _by_label["ours(1) / floor"], 1.15, "at most"),
    Target("ours(5) at most twice ours(1)", _by_label["ours(5) / ours(1)"], 2.0, "at most"),
    Target(
        "ours(5) at least 8x faster than pottery(5)",
        _by_label["pottery(5) / ours(5)"],
        8.0,
        "at least",
    ),
    Target(
        "ours(1) no slower than redis-py Lock",
        _by_label["redis-py Lock / ours(1)"],
        1.0,
        "at least",
    ),
]

_PLOT_FAMILIES = {
    "ours": "ours (celery_dlock Redlock)",
    "pottery": "pottery Redlock",
    "floor": "floor (SET NX + EVALSHA)",
    "raw": "raw fan-out (2 x PING to N nodes)",
}


def run(options: RunOptions) -> ScenarioResult:
    """Start the nodes, time every variant, and summarize."""
    schedule = QUICK if options.quick else FULL
    notes: list[str] = []
    with (
        servers.nodes(max(NODE_COUNTS)) as nodes,
        servers.SentinelTopology() as sentinel,
        servers.ClusterTopology() as cluster,
        ExitStack() as cleanup,
    ):
        variants = _variants(list(nodes), sentinel, cluster, cleanup, notes)
        with cpus.pinned(options.layout, servers.pids([*nodes, sentinel.master, *cluster.servers])):
            timings = run_interleaved(variants, schedule, options.rng())
    result = build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=schedule,
        variants=variants,
        timings=timings,
        ratios=RATIOS,
        targets=TARGETS,
        notes=notes,
    )
    plot = LinePlot(
        filename="latency.png",
        title="Uncontended acquire + release: median latency",
        x_label="Redis nodes",
        y_label="median latency (µs, log scale)",
        series=medians_by_nodes(result.rows, _PLOT_FAMILIES),
        log_y=True,
    )
    return replace(result, plots=[plot])


SCENARIO = Scenario(name="latency", title="Scenario 1: uncontended lock latency", run=run)


# -- the variants ---------------------------------------------------------------


def _variants(
    nodes: Sequence[servers.RedisProcess],
    sentinel: servers.SentinelTopology,
    cluster: servers.ClusterTopology,
    cleanup: ExitStack,
    notes: list[str],
) -> list[Variant]:
    """Every variant, in table order; missing optional libraries are noted, skipped."""
    pottery = optional_import("pottery", notes)
    redis_lock = optional_import("redis_lock", notes, package="python-redis-lock")

    def one(family: str, label: str, op: Op) -> list[Variant]:
        return [Variant(key(family), label, family, 1, op)]

    def each_count(family: str, label: str, build: Callable[[Sequence[servers.RedisProcess]], Op]) -> list[Variant]:
        return [Variant(key(family, n), f"{label} ({n})", family, n, build(nodes[:n])) for n in NODE_COUNTS]

    variants = each_count("raw", "raw fan-out", lambda group: _raw_fan_out(group, cleanup))
    variants += one("floor", "floor: SET NX + EVALSHA", _floor(nodes[0]))
    variants += each_count("ours", "ours", lambda group: _ours(group, cleanup))
    variants += one("ours-sentinel", "ours via Sentinel", _ours_sentinel(sentinel, cleanup))
    variants += one(
        "ours-cluster", "ours via Cluster", _acquire_release_ours(Redlock(cluster.url), _name("ours-cluster"), cleanup)
    )
    variants += one("redis-py", "redis-py Lock", _redis_py(nodes[0]))
    if redis_lock is not None:
        lock = redis_lock.Lock(nodes[0].client(), _name("python-redis-lock"), expire=TTL_SECONDS)
        variants += one("python-redis-lock", "python-redis-lock", _acquire_release(lock))
    if pottery is not None:
        variants += each_count("pottery", "pottery Redlock", lambda group: _pottery(pottery, group))
    return variants


def _name(family: str, nodes: int = 1) -> str:
    """The Redis key a variant locks (libraries may add a prefix)."""
    return f"bench:latency:{key(family, nodes)}"


def _floor(node: servers.RedisProcess) -> Op:
    client = node.client()
    sha = client.script_load(_COMPARE_AND_DELETE)
    name = _name("floor")
    ttl_ms = TTL_SECONDS * 1000

    def op() -> None:
        token = secrets.token_hex(16)
        if not client.set(name, token, nx=True, px=ttl_ms):
            raise RuntimeError(f"floor: {name} was held")
        if client.evalsha(sha, 1, name, token) != 1:
            raise RuntimeError(f"floor: {name} was not ours to delete")

    return op


def _ours(nodes: Sequence[servers.RedisProcess], cleanup: ExitStack) -> Op:
    return _acquire_release_ours(Redlock([node.url for node in nodes]), _name("ours", len(nodes)), cleanup)


def _ours_sentinel(topology: servers.SentinelTopology, cleanup: ExitStack) -> Op:
    redlock = Redlock(topology.url, sentinel_master=topology.master_name)
    return _acquire_release_ours(redlock, _name("ours-sentinel"), cleanup)


def _acquire_release_ours(redlock: Redlock, name: str, cleanup: ExitStack) -> Op:
    cleanup.callback(redlock.close)

    def op() -> None:
        if not redlock.acquire(name, TTL_SECONDS, blocking=False).release():
            raise RuntimeError(f"ours: {name} was not released on a quorum")

    return op


def _redis_py(node: servers.RedisProcess) -> Op:
    lock = node.client().lock(_name("redis-py"), timeout=TTL_SECONDS)
    return _acquire_release(lock)


def _pottery(module: Any, nodes: Sequence[servers.RedisProcess]) -> Op:
    lock = module.Redlock(
        key=_name("pottery", len(nodes)),
        masters={node.client() for node in nodes},
        auto_release_time=TTL_SECONDS,
    )
    return _acquire_release(lock)


def _acquire_release(lock: Any) -> Op:
    """The operation for a reusable lock object with ``acquire(blocking=...)``."""
    acquire: Callable[..., bool] = lock.acquire
    release: Callable[[], object] = lock.release

    def op() -> None:
        if not acquire(blocking=False):
            raise RuntimeError(f"{lock!r} was not acquired")
        release()

    return op


def _raw_fan_out(nodes: Sequence[servers.RedisProcess], cleanup: ExitStack) -> Op:
    socks = []
    for node in nodes:
        sock = cleanup.enter_context(socket.create_connection((servers.HOST, node.port), timeout=1.0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
    ping = b"PING\r\n"

    def op() -> None:
        for _ in range(2):
            for sock in socks:
                sock.sendall(ping)
            for sock in socks:
                reply = sock.recv(64)
                while len(reply) < len(_PONG):
                    reply += sock.recv(64)
                if reply != _PONG:
                    raise RuntimeError(f"raw fan-out: unexpected reply {reply!r}")

    return op
