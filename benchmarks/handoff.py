"""Scenario 2: handoff latency on a contended key.

How long a key stays idle between two owners: from the moment the holder
starts its release to the moment the next waiter's blocking ``acquire``
returns holding it.  Locks that poll find out late; ours is woken by the
release itself (a PUBLISH from the release script to the waiter's
subscription).  Both parties are threads of this process, so one
:func:`time.perf_counter_ns` clock times them.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from celery_dlock.lock.redlock import Lock, Redlock

from . import cpus, servers
from .harness import Schedule, Variant, run_interleaved
from .optional import optional_import
from .scenario import RunOptions, Scenario, ScenarioResult, build_result
from .stats import Ratio

__all__ = ["FULL", "QUICK", "SCENARIO", "Contender", "Handoff", "WaiterFailed", "run"]

#: About 70 s on two vCPUs: each sample holds the key for 105 ms on average.
FULL = Schedule(rounds=10, warmup=1, batch=10)
#: A few seconds.
QUICK = Schedule(rounds=2, warmup=0, batch=3)

#: The lease; far longer than any hold, so none lapses.
TTL_SECONDS = 10
#: How long a blocked acquire may wait before the sample fails.
WAIT_SECONDS = 10.0
#: The holder keeps the key this long, plus up to :data:`HOLD_SPREAD`.
HOLD_MIN = 0.005
#: Random extra hold: as long as the slowest poller's period, so a release
#: lands at a random point of every poller's cycle.
HOLD_SPREAD = 0.2

METHOD = f"""\
Two threads contend for one key on one redis-server.  Each sample: the
first thread takes the key; the second starts a blocking acquire and is left
blocked for {HOLD_MIN * 1000:.0f} ms plus a random 0 to {HOLD_SPREAD * 1000:.0f} ms (so a release falls at
a random point of a poller's sleep); then the holder reads the clock and
releases.  The sample is the time from just before that release to the
waiter's acquire returning: the release round trip, the waiter learning of
it, and its winning attempt.  Both threads read `time.perf_counter_ns` in
one process.  Every library gets a {TTL_SECONDS} s lease, a {WAIT_SECONDS:.0f} s limit on the wait, and
its own default wake-up:

* **ours**: `Redlock.acquire(key, ttl, blocking=True, timeout=...)`: after a
  refused attempt it subscribes to the key's release channel, and the
  release script publishes to it.
* **redis-py Lock**: `client.lock(name, timeout=ttl).acquire(blocking=True)`:
  retries every `sleep=0.1` s.
* **python-redis-lock**: `redis_lock.Lock(client, name, expire=ttl)`: BLPOP on
  a signal list that the release pushes to.
* **pottery**: `Redlock(key=..., masters={{client}}, auto_release_time=ttl)`:
  retries after a random sleep of up to 0.2 s.
"""


def key(family: str) -> str:
    """The variant key of ``family`` (one node each)."""
    return f"{family}-1"


RATIOS = [
    Ratio("redis-py Lock / ours", key("redis-py"), key("ours")),
    Ratio("python-redis-lock / ours", key("python-redis-lock"), key("ours")),
    Ratio("pottery / ours", key("pottery"), key("ours")),
]


@dataclass(frozen=True)
class Contender:
    """One party's blocking acquire and its release of the shared key."""

    acquire: Callable[[], None]
    release: Callable[[], None]


class WaiterFailed(RuntimeError):
    """The waiting thread of a handoff raised; the cause is chained."""


class Handoff:
    """The op of one variant: the calling thread holds, a helper thread waits.

    The helper is a daemon thread that sleeps on a queue between samples,
    so variants not being timed stay idle.  :meth:`close` stops it.
    """

    def __init__(self, name: str, holder: Contender, waiter: Contender, rng: random.Random) -> None:
        self.name = name
        self._holder = holder
        self._waiter = waiter
        self._rng = rng
        self._go: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[int | Exception] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._wait_loop, name=f"handoff-{name}", daemon=True)
        self._thread.start()

    def __call__(self) -> int:
        """One handoff; returns release-to-acquired in nanoseconds."""
        self._holder.acquire()
        self._go.put(True)
        time.sleep(HOLD_MIN + self._rng.uniform(0, HOLD_SPREAD))
        released_at = time.perf_counter_ns()
        self._holder.release()
        outcome = self._done.get(timeout=WAIT_SECONDS + 5)
        if isinstance(outcome, Exception):
            raise WaiterFailed(f"{self.name}: the waiter failed") from outcome
        if outcome <= released_at:
            raise RuntimeError(f"{self.name}: the waiter held the key before it was released")
        return outcome - released_at

    def close(self) -> None:
        """Stop the helper thread."""
        self._go.put(False)
        self._thread.join(WAIT_SECONDS + 5)

    def _wait_loop(self) -> None:
        while self._go.get():
            try:
                self._waiter.acquire()
                acquired_at = time.perf_counter_ns()
                self._waiter.release()
            except Exception as exc:
                self._done.put(exc)
            else:
                self._done.put(acquired_at)


def run(options: RunOptions) -> ScenarioResult:
    """Start a node, time every library's handoffs, and summarize."""
    schedule = QUICK if options.quick else FULL
    notes: list[str] = []
    with servers.nodes(1) as cluster, ExitStack() as cleanup:
        node = cluster[0]
        with cpus.pinned(options.layout, servers.pids(cluster)):
            variants = _variants(node, cleanup, notes, random.Random(options.seed))
            timings = run_interleaved(variants, schedule, options.rng())
    return build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=schedule,
        variants=variants,
        timings=timings,
        ratios=RATIOS,
        targets=[],
        notes=notes,
        unit="ms",
    )


SCENARIO = Scenario(name="handoff", title="Scenario 2: handoff latency on a contended key", run=run)


# -- the contenders ---------------------------------------------------------------


def _variants(
    node: servers.RedisProcess,
    cleanup: ExitStack,
    notes: list[str],
    seeds: random.Random,
) -> list[Variant]:
    """One :class:`Handoff` per library installed, each closed on exit."""
    pottery = optional_import("pottery", notes)
    redis_lock = optional_import("redis_lock", notes, package="python-redis-lock")
    builders: list[tuple[str, str, Callable[[], Contender]]] = [
        ("ours", "ours", lambda: _ours(node, cleanup)),
        ("redis-py", "redis-py Lock", lambda: _redis_py(node)),
    ]
    if redis_lock is not None:
        builders.append(
            (
                "python-redis-lock",
                "python-redis-lock",
                lambda: _python_redis_lock(redis_lock, node),
            )
        )
    if pottery is not None:
        builders.append(("pottery", "pottery Redlock", lambda: _pottery(pottery, node)))
    variants = []
    for family, label, build in builders:
        handoff = Handoff(family, build(), build(), random.Random(seeds.random()))
        cleanup.callback(handoff.close)
        variants.append(Variant(key(family), label, family, 1, handoff, self_timed=True))
    return variants


def _name(family: str) -> str:
    return f"bench:handoff:{family}"


def _client(node: servers.RedisProcess) -> Any:
    """A client of its own, with no socket timeout: waits may block for long."""
    return node.client(socket_timeout=None)


def _ours(node: servers.RedisProcess, cleanup: ExitStack) -> Contender:
    redlock = Redlock([node.url])
    cleanup.callback(redlock.close)
    held: list[Lock] = []

    def acquire() -> None:
        held.append(redlock.acquire(_name("ours"), TTL_SECONDS, blocking=True, timeout=WAIT_SECONDS))

    def release() -> None:
        if not held.pop().release():
            raise RuntimeError("ours: the lock was not released on a quorum")

    return Contender(acquire, release)


def _redis_py(node: servers.RedisProcess) -> Contender:
    lock = _client(node).lock(_name("redis-py"), timeout=TTL_SECONDS, blocking_timeout=WAIT_SECONDS)
    return _blocking(lock, "redis-py Lock")


def _python_redis_lock(module: Any, node: servers.RedisProcess) -> Contender:
    lock = module.Lock(_client(node), _name("python-redis-lock"), expire=TTL_SECONDS)
    return _blocking(lock, "python-redis-lock", timeout=WAIT_SECONDS)


def _pottery(module: Any, node: servers.RedisProcess) -> Contender:
    lock = module.Redlock(key=_name("pottery"), masters={_client(node)}, auto_release_time=TTL_SECONDS)
    return _blocking(lock, "pottery", timeout=WAIT_SECONDS)


def _blocking(lock: Any, label: str, **acquire_options: Any) -> Contender:
    """A contender over a lock object with ``acquire(blocking=True, ...)``."""

    def acquire() -> None:
        if not lock.acquire(blocking=True, **acquire_options):
            raise RuntimeError(f"{label}: not acquired within {WAIT_SECONDS} s")

    return Contender(acquire, lock.release)
