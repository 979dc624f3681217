"""Scenario: semaphores, ``limit=N`` permits of one key.

Uncontended, one operation is an acquire and a release of a permit nobody
else is after, timed for our ``limit=5`` on 1 and 5 nodes next to our plain
lock (``limit=1``) and Dramatiq's ``ConcurrentRateLimiter`` on a Redis
backend.  Contended, eight threads take one of five permits of one key again
and again, each holding it for a fixed time, and the rate of permits granted
is set against the most the limit allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from celery_dlock.lock.redlock import Redlock

from . import cpus, servers
from .harness import Op, Schedule, Variant, run_interleaved
from .optional import optional_import
from .scenario import RunOptions, Scenario, ScenarioResult, Table, build_result
from .stats import Ratio, Target

__all__ = ["FULL", "QUICK", "SCENARIO", "run"]

FULL = Schedule(rounds=200, warmup=10, batch=20)
QUICK = Schedule(rounds=5, warmup=1, batch=5)

TTL_SECONDS = 10
LIMIT = 5

#: The contended run: threads, how long each holds its permit, and for how long it runs.
CONTENDERS = 8
HOLD_SECONDS = 0.01
CONTENDED_SECONDS = {True: 1.0, False: 8.0}

METHOD = f"""\
Uncontended: each operation acquires and releases one permit of a key no one
else wants, non-blocking, with a {TTL_SECONDS} s lease, timed on its own and
interleaved round by round with the other variants.

* **ours, lock**: ``Redlock(urls).acquire(key, ttl, blocking=False)`` then
  ``release()``: the plain lock's scripts, as every ``limit=1`` call sends.
* **ours, limit={LIMIT}**: the same with ``limit={LIMIT}``: the permit scripts (a sorted
  set trimmed of ended permits in the same script), on 1 and on 5 nodes
  (a permit needs ⌊5·{LIMIT}/{LIMIT + 1}⌋+1 = {5 * LIMIT // (LIMIT + 1) + 1} of 5).
* **Dramatiq ConcurrentRateLimiter**: ``ConcurrentRateLimiter(RedisBackend(client=...),
  key, limit={LIMIT}, ttl=...)``, ``with limiter.acquire(raise_on_failure=False)``, on
  one node.  It has no fencing token and no renewal.

Contended: {CONTENDERS} threads of one process share one ``Redlock`` and take a
permit of one key with ``limit={LIMIT}`` in a loop (blocking, woken by releases),
hold it {HOLD_SECONDS * 1000:.0f} ms, and release it.  The limit allows at most
{LIMIT} / {HOLD_SECONDS} s = {LIMIT / HOLD_SECONDS:.0f} permits per second.
"""


def key(family: str, nodes: int = 1) -> str:
    """The variant key of ``family`` on ``nodes`` nodes."""
    return f"{family}-{nodes}"


RATIOS = [
    Ratio(f"ours limit={LIMIT} (1) / ours lock (1)", key("ours-limit"), key("ours-lock")),
    Ratio(f"ours limit={LIMIT} (5) / ours limit={LIMIT} (1)", key("ours-limit", 5), key("ours-limit")),
    Ratio(f"Dramatiq limit={LIMIT} / ours limit={LIMIT} (1)", key("dramatiq"), key("ours-limit")),
]

TARGETS = [
    Target(f"ours limit={LIMIT} no slower than Dramatiq's limiter", RATIOS[2], 1.0, "at least"),
]


def run(options: RunOptions) -> ScenarioResult:
    """Start the nodes, time every variant, run the contended loop, and summarize."""
    schedule = QUICK if options.quick else FULL
    notes: list[str] = []
    dramatiq = optional_import("dramatiq.rate_limits", notes, package="dramatiq")
    with servers.nodes(5) as nodes, ExitStack() as cleanup:
        variants = _variants(list(nodes), dramatiq, cleanup)
        with cpus.pinned(options.layout, servers.pids(list(nodes))):
            timings = run_interleaved(variants, schedule, options.rng())
            contended = _contended(nodes[0].url, CONTENDED_SECONDS[options.quick])
    rate, most = contended
    table = Table(
        heading=f"### Contended: {CONTENDERS} threads, limit={LIMIT}, {HOLD_SECONDS * 1000:.0f} ms holds, 1 node",
        header=("permits granted / s", "the limit allows / s", "share of the limit", "most held at once"),
        rows=[[f"{rate:.0f}", f"{LIMIT / HOLD_SECONDS:.0f}", f"{rate * HOLD_SECONDS / LIMIT:.2f}", str(most)]],
    )
    return build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=schedule,
        variants=variants,
        timings=timings,
        ratios=RATIOS,
        targets=TARGETS,
        notes=notes,
        tables=[table],
    )


SCENARIO = Scenario(name="semaphore", title="Scenario: semaphores (limit=N)", run=run)


def _variants(nodes: Sequence[servers.RedisProcess], dramatiq: Any, cleanup: ExitStack) -> list[Variant]:
    variants = [
        Variant(key("ours-lock"), "ours, lock (1)", "ours-lock", 1, _ours(nodes[:1], 1, cleanup)),
        Variant(key("ours-limit"), f"ours, limit={LIMIT} (1)", "ours-limit", 1, _ours(nodes[:1], LIMIT, cleanup)),
        Variant(key("ours-limit", 5), f"ours, limit={LIMIT} (5)", "ours-limit", 5, _ours(nodes, LIMIT, cleanup)),
    ]
    if dramatiq is not None:
        variants.append(Variant(key("dramatiq"), f"Dramatiq limit={LIMIT} (1)", "dramatiq", 1, _dramatiq(nodes[0])))
    return variants


def _ours(nodes: Sequence[servers.RedisProcess], limit: int, cleanup: ExitStack) -> Op:
    redlock = Redlock([node.url for node in nodes])
    cleanup.callback(redlock.close)
    name = f"bench:semaphore:ours:{limit}:{len(nodes)}"

    def op() -> None:
        if not redlock.acquire(name, TTL_SECONDS, blocking=False, limit=limit).release():
            raise RuntimeError(f"ours: {name} was not released on a quorum")

    return op


def _dramatiq(node: servers.RedisProcess) -> Op:
    from dramatiq.rate_limits import ConcurrentRateLimiter
    from dramatiq.rate_limits.backends import RedisBackend

    limiter = ConcurrentRateLimiter(
        RedisBackend(client=node.client()), "bench:semaphore:dramatiq", limit=LIMIT, ttl=TTL_SECONDS * 1000
    )

    def op() -> None:
        with limiter.acquire(raise_on_failure=False) as acquired:
            if not acquired:
                raise RuntimeError("dramatiq: no permit free")

    return op


def _contended(url: str, seconds: float) -> tuple[float, int]:
    """Permits granted per second by :data:`CONTENDERS` threads, and the most held at once."""
    redlock = Redlock(url, retry_count=10_000, retry_delay=0.05, retry_jitter=0.01)
    name = "bench:semaphore:contended"
    granted = 0
    held = most = 0
    mutex = threading.Lock()
    deadline = time.monotonic() + seconds

    def contend() -> None:
        nonlocal granted, held, most
        while time.monotonic() < deadline:
            with redlock.lock(name, TTL_SECONDS, limit=LIMIT, auto_extend=False):
                with mutex:
                    held += 1
                    most = max(most, held)
                time.sleep(HOLD_SECONDS)
                with mutex:
                    held -= 1
                    granted += 1

    started = time.monotonic()
    threads = [threading.Thread(target=contend) for _ in range(CONTENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    redlock.close()
    return granted / (time.monotonic() - started), most
