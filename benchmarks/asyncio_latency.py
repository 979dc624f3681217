"""Scenario: uncontended lock latency from asyncio.

One operation is an ``await`` of an acquire and a release of a key nobody
else wants, on one event loop.  It is timed for our
:class:`~celery_dlock.aio.AsyncRedlock` on 1 and 5 nodes, for redis-py's
``redis.asyncio.lock.Lock`` on one node, and for pottery's ``AIORedlock`` on 1
and 5 nodes.  Each operation times itself inside the loop, so the cost of
entering the loop from the harness is not counted for anyone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio

from celery_dlock.aio import AsyncRedlock

from . import cpus, servers
from .harness import Op, Schedule, Variant, run_interleaved
from .optional import optional_import
from .scenario import RunOptions, Scenario, ScenarioResult, build_result
from .stats import Ratio, Target

__all__ = ["FULL", "QUICK", "SCENARIO", "run"]

#: The node counts measured; the 1-node group is the first node of the 5.
NODE_COUNTS = (1, 5)

#: About 20 s on two vCPUs; pottery takes most of it.
FULL = Schedule(rounds=200, warmup=20, batch=20)
#: Under a second: enough to show that every variant runs.
QUICK = Schedule(rounds=5, warmup=1, batch=10)

#: The lease, long enough never to lapse during an operation.
TTL_SECONDS = 10

METHOD = f"""\
Each operation awaits an acquire and a release of one key that no one else
wants, on one event loop kept for the whole run, and times itself inside the
loop (so entering the loop from the harness is not counted); the lease is
{TTL_SECONDS} s and every acquire is non-blocking.  All clients talk TCP over
loopback; the 1-node variants use the first of the 5 nodes.

* **ours (async)**: ``await AsyncRedlock(urls).acquire(key, ttl, blocking=False)``
  then ``await lock.release()``: 2 fan-outs, each node's command in a task of its
  own, decided at quorum.
* **redis-py asyncio Lock**: ``redis.asyncio.Redis.lock(name, timeout=ttl)``,
  ``acquire(blocking=False)`` then ``release()``: 2 round trips.
* **pottery AIORedlock**: ``AIORedlock(key=..., masters={{...}}, auto_release_time=ttl)``,
  ``acquire(blocking=False)`` then ``release()``.
"""


def key(family: str, nodes: int = 1) -> str:
    """The variant key of ``family`` on ``nodes`` nodes, such as ``ours-async-5``."""
    return f"{family}-{nodes}"


RATIOS = [
    Ratio("redis-py asyncio Lock / ours async(1)", key("redis-py-async"), key("ours-async")),
    Ratio("ours async(5) / ours async(1)", key("ours-async", 5), key("ours-async")),
    *(
        Ratio(f"pottery AIORedlock({n}) / ours async({n})", key("pottery-async", n), key("ours-async", n))
        for n in NODE_COUNTS
    ),
]

_by_label = {ratio.label: ratio for ratio in RATIOS}

TARGETS = [
    Target(
        "ours async(1) no slower than redis-py's asyncio Lock",
        _by_label["redis-py asyncio Lock / ours async(1)"],
        1.0,
        "at least",
    ),
    Target("ours async(5) at most twice ours async(1)", _by_label["ours async(5) / ours async(1)"], 2.0, "at most"),
]


def run(options: RunOptions) -> ScenarioResult:
    """Start the nodes and an event loop, time every variant, and summarize."""
    schedule = QUICK if options.quick else FULL
    notes: list[str] = []
    loop = asyncio.new_event_loop()
    closers: list[Callable[[], Awaitable[object]]] = []
    try:
        with servers.nodes(max(NODE_COUNTS)) as nodes:
            variants = _variants(loop, list(nodes), closers, notes)
            with cpus.pinned(options.layout, servers.pids(nodes)):
                timings = run_interleaved(variants, schedule, options.rng())
            for close in closers:
                loop.run_until_complete(close())
    finally:
        loop.close()
    return build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=schedule,
        variants=variants,
        timings=timings,
        ratios=RATIOS,
        targets=TARGETS,
        notes=notes,
    )


SCENARIO = Scenario(name="asyncio", title="Scenario: uncontended lock latency from asyncio", run=run)


# -- the variants ---------------------------------------------------------------


def _variants(
    loop: asyncio.AbstractEventLoop,
    nodes: Sequence[servers.RedisProcess],
    closers: list[Callable[[], Awaitable[object]]],
    notes: list[str],
) -> list[Variant]:
    """Every variant, in table order; pottery, if missing, is noted and skipped."""
    pottery = optional_import("pottery", notes)

    def each_count(family: str, label: str, build: Callable[[Sequence[servers.RedisProcess]], Op]) -> list[Variant]:
        return [
            Variant(key(family, n), f"{label} ({n})", family, n, build(nodes[:n]), self_timed=True) for n in NODE_COUNTS
        ]

    def ours(group: Sequence[servers.RedisProcess]) -> Op:
        redlock = AsyncRedlock([node.url for node in group])
        closers.append(redlock.close)
        name = _name("ours-async", len(group))

        async def op() -> None:
            if not await (await redlock.acquire(name, TTL_SECONDS, blocking=False)).release():
                raise RuntimeError(f"ours: {name} was not released on a quorum")

        return _timed(loop, op)

    def redis_py(node: servers.RedisProcess) -> Op:
        client = redis.asyncio.Redis.from_url(node.url, socket_timeout=1.0)
        closers.append(client.aclose)
        return _acquire_release(loop, client.lock(_name("redis-py-async"), timeout=TTL_SECONDS))

    def pottery_lock(group: Sequence[servers.RedisProcess]) -> Op:
        masters = {redis.asyncio.Redis.from_url(node.url, socket_timeout=1.0) for node in group}
        closers.extend(master.aclose for master in masters)
        lock = pottery.AIORedlock(
            key=_name("pottery-async", len(group)), masters=masters, auto_release_time=TTL_SECONDS
        )
        return _acquire_release(loop, lock)

    variants = each_count("ours-async", "ours (async)", ours)
    variants.append(
        Variant(
            key("redis-py-async"), "redis-py asyncio Lock", "redis-py-async", 1, redis_py(nodes[0]), self_timed=True
        )
    )
    if pottery is not None:
        variants += each_count("pottery-async", "pottery AIORedlock", pottery_lock)
    return variants


def _name(family: str, nodes: int = 1) -> str:
    """The Redis key a variant locks (libraries may add a prefix)."""
    return f"bench:asyncio:{key(family, nodes)}"


def _timed(loop: asyncio.AbstractEventLoop, work: Callable[[], Awaitable[None]]) -> Op:
    """A self-timed op: ``work`` run on ``loop``, timed from inside it, in nanoseconds."""

    async def sample() -> int:
        started = time.perf_counter_ns()
        await work()
        return time.perf_counter_ns() - started

    return lambda: loop.run_until_complete(sample())


def _acquire_release(loop: asyncio.AbstractEventLoop, lock: Any) -> Op:
    """The op for a reusable asyncio lock object with ``acquire(blocking=...)`` and ``release()``."""

    async def op() -> None:
        if not await lock.acquire(blocking=False):
            raise RuntimeError(f"{lock!r} was not acquired")
        await lock.release()

    return _timed(loop, op)
