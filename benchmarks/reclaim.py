"""Scenario 6: SIGKILL of a whole worker to its lock free.

When a whole worker dies (main process and pool), nothing releases its
task's lock: without ``dlock_reclaim_offline`` the lock is free only when
its lease runs out.  With it, a surviving worker's main process reaps the
dead one's locks after Celery's heartbeat expiry, a grace and an unanswered
ping (:mod:`celery_dlock.celery.reaper`, docs/reclaim.md).  Each sample
starts two real prefork workers, kills the one holding the lock, and polls
the lock until it is gone.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from celery_dlock.celery.reaper import EXPIRY_INTERVALS, PING_TIMEOUT, TICK
from celery_dlock.celery.settings import Settings
from celery_dlock.lock.keyspace import Keyspace
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.worker_process import WorkerProcess

from . import celery_app, workers
from .celery_app import RECLAIM_KEY, RECLAIM_TTL, WARM_QUEUE, WORK_QUEUE
from .harness import Schedule, Variant, run_interleaved
from .scenario import RunOptions, Scenario, ScenarioResult, Table, build_result
from .stats import Ratio

__all__ = ["FULL", "QUICK", "SCENARIO", "Reclaimed", "Setup", "Size", "kill_and_wait", "run"]

#: Celery's worker heartbeat interval when ``--heartbeat-interval`` is not given.
CELERY_HEARTBEAT = 2.0
#: ``dlock_reclaim_grace`` as it comes: every variant runs with the default.
GRACE = Settings.reclaim_grace
#: The held task's body sleeps this long: until its worker is killed.
HOLD_SECONDS = 3600.0
#: The watchdog renews a lease once this share of the ttl has passed (``Redlock``'s ``extend_every``).
EXTEND_EVERY = 1 / 3
#: The holder is killed a random 0 to this many seconds after its lock is seen, so that the
#: kill lands anywhere in the watchdog's renewal cycle, and in the heartbeats' cycle.
KILL_SPREAD = RECLAIM_TTL * EXTEND_EVERY
#: The lock is polled this often after the kill.
POLL_SECONDS = 0.01
#: The name of the lock, from the key the task locks (the app's default prefix).
LOCK_NAME = Keyspace().lock(RECLAIM_KEY)


@dataclass(frozen=True)
class Setup:
    """One variant: the app's variant, and the heartbeat interval of both workers.

    Attributes:
        key: The variant key.
        label: Its name in the tables.
        variant: The :data:`benchmarks.celery_app.VARIANTS` entry both workers run.
        heartbeat: Seconds between each worker's heartbeats.
        reclaim: Whether ``dlock_reclaim_offline`` is on.

    """

    key: str
    label: str
    variant: str
    heartbeat: float
    reclaim: bool

    @property
    def bound(self) -> float:
        """The most the kill may take to free the lock, in seconds.

        With reclaiming: Celery's expiry (2 heartbeats), the grace, a reaper
        tick and the ping's timeout.  Without: the ttl.
        """
        if not self.reclaim:
            return RECLAIM_TTL
        return float(EXPIRY_INTERVALS * self.heartbeat + GRACE + TICK + PING_TIMEOUT)


TTL_ONLY = Setup(
    "ttl-only",
    "ttl only: dlock_reclaim_offline off",
    "ours-ttl-only",
    CELERY_HEARTBEAT,
    reclaim=False,
)


def reclaiming(heartbeat: float) -> Setup:
    """The variant with ``dlock_reclaim_offline`` on, both workers beating every ``heartbeat`` s."""
    return Setup(
        f"reclaim-hb{heartbeat:g}",
        f"ours: dlock_reclaim_offline on, heartbeat {heartbeat:g} s",
        "ours-reclaim",
        heartbeat,
        reclaim=True,
    )


@dataclass(frozen=True)
class Size:
    """How big a run is: its rounds, and the heartbeats of the reclaiming variants."""

    schedule: Schedule
    heartbeats: tuple[float, ...]

    def setups(self) -> list[Setup]:
        """The baseline, then one reclaiming variant per heartbeat."""
        return [TTL_ONLY, *(reclaiming(heartbeat) for heartbeat in self.heartbeats)]


#: About 2 minutes on two vCPUs: 3 rounds of 3 kills (10 to 15 s, 7 s and 8 s), each after starting
#: 2 workers (about a second) and up to 5 s of holding.
FULL = Size(Schedule(rounds=3, warmup=0, batch=1), heartbeats=(1.0, CELERY_HEARTBEAT))
#: About half a minute: one kill of the baseline and one with heartbeats every second.
QUICK = Size(Schedule(rounds=1, warmup=0, batch=1), heartbeats=(1.0,))

METHOD = f"""\
The time from `SIGKILL` of a whole worker (main process and pool at once)
that holds a single-flight task's lock to that lock being free.  Each sample
starts, on a broker and a lock server (two spawned redis-servers), two real
`celery worker -P prefork -c 1` processes, both sending heartbeats: the
*holder* consumes the queue the task is sent to, the *observer* another one,
and survives.  The task is `@single_flight(key=..., ttl={RECLAIM_TTL:g})`; its body
sleeps for an hour.  Once the lock exists (its name from
`Keyspace.lock`) and, with reclaiming, the observer's log says it watches
both workers, the holder's process group is killed a random 0 to {KILL_SPREAD:g} s
later (anywhere in the watchdog's renewal cycle), and the lock is
polled every {POLL_SECONDS * 1000:.0f} ms until it is gone (monotonic clock).

* **ttl only**: `dlock_reclaim_offline` off (the default): the lock is free
  when its lease runs out.  The watchdog renews it every third of the ttl,
  so {RECLAIM_TTL - KILL_SPREAD:g} to {RECLAIM_TTL:g} s are left at the kill, by where the renewal
  cycle was (the lease left is read just before the kill).
* **ours**: `dlock_reclaim_offline = True` on both workers, the default
  `dlock_reclaim_grace` ({GRACE:g} s), heartbeats every 1 s and every
  {CELERY_HEARTBEAT:g} s (Celery's default).  The observer's main process reaps the
  holder once it has heard nothing from it for Celery's expiry (2
  heartbeats) plus the grace, and a ping gets no reply within
  {PING_TIMEOUT:g} s; it looks every {TICK:g} s.  So the bound is 2 heartbeats + grace +
  {TICK:g} s + {PING_TIMEOUT:g} s, and a kill just before a heartbeat is due frees up to one
  interval sooner.

Variants are interleaved: every round kills once per variant, in a new
random order.  Nothing is pinned.  The ratios are ttl only over ours, of
the medians and per round.
"""


def ratios(heartbeats: Sequence[float]) -> list[Ratio]:
    """How many times sooner than the lease running out each reclaiming variant frees the lock."""
    return [
        Ratio(f"ttl only / ours, heartbeat {heartbeat:g} s", TTL_ONLY.key, reclaiming(heartbeat).key)
        for heartbeat in heartbeats
    ]


@dataclass(frozen=True)
class Reclaimed:
    """What one kill measured.

    Attributes:
        free_ns: From the kill to the lock being gone.
        lease_left_ms: The lock's remaining lease, read just before the kill.
        reaped: Whether the observer's log says it reclaimed the lock.

    """

    free_ns: int
    lease_left_ms: int
    reaped: bool


#: What the observer logs once it has reclaimed the killed worker's lock.
RECLAIM_LINE = "reclaimed 1 lock(s) of offline worker"


def _logged_reclaim(observer: WorkerProcess) -> bool:
    """Whether the observer logs its reclaim: it releases the lock first, so the line can trail the poll."""
    try:
        observer.wait_for_log(re.escape(RECLAIM_LINE), timeout=5)
    except AssertionError:
        return False
    return True


def kill_and_wait(stack: workers.Stack, setup: Setup, delay: float) -> Reclaimed:
    """Start a holder and an observer of ``setup``, kill the holder, and time its lock's freeing.

    The holder is killed ``delay`` seconds after its lock is seen.
    """
    stack.flush()
    app, task = celery_app.build(setup.variant, stack.urls)
    observer, holder = (
        workers.new_worker(
            stack,
            setup.variant,
            concurrency=1,
            queues=[queue],
            name=f"bench-{role}",
            heartbeat=setup.heartbeat,
        )
        for role, queue in (("observer", WARM_QUEUE), ("holder", WORK_QUEUE))
    )
    locks = stack.locks
    try:
        with ThreadPoolExecutor(2) as starting:
            list(starting.map(WorkerProcess.start, (observer, holder)))
        if setup.reclaim:
            for hostname in (observer.hostname, holder.hostname):
                observer.wait_for_log(f"watching worker {re.escape(hostname or '')}", timeout=10)
        task.apply_async((0, HOLD_SECONDS), queue=WORK_QUEUE)
        holder.wait_for(lambda: locks.exists(LOCK_NAME), 30, what="the task's lock")
        time.sleep(delay)
        lease_left_ms = int(locks.pttl(LOCK_NAME))
        killed = time.monotonic_ns()
        holder.kill()
        wait_until(
            lambda: not locks.exists(LOCK_NAME),
            setup.bound + 10,
            interval=POLL_SECONDS,
            message=lambda: f"the lock of the killed worker to be free:\n{observer.log_tail()}",
        )
        free_ns = time.monotonic_ns() - killed
        reaped = _logged_reclaim(observer) if setup.reclaim else RECLAIM_LINE in observer.log
    finally:
        for worker in (holder, observer):
            workers.discard(worker)
        app.close()
    if reaped != setup.reclaim:
        raise RuntimeError(f"{setup.key}: the observer {'did not reclaim' if setup.reclaim else 'reclaimed'} the lock")
    return Reclaimed(free_ns, lease_left_ms, reaped)


def run(options: RunOptions) -> ScenarioResult:
    """Kill a lock-holding worker under every variant, interleaved, and summarize."""
    size = QUICK if options.quick else FULL
    setups = size.setups()
    kills: dict[str, list[Reclaimed]] = {setup.key: [] for setup in setups}
    delays = random.Random(options.seed)
    with workers.stack() as servers:
        variants = [
            Variant(
                setup.key,
                setup.label,
                setup.key,
                1,
                _kill_op(servers, setup, random.Random(delays.random()), kills[setup.key]),
                self_timed=True,
            )
            for setup in setups
        ]
        timings = run_interleaved(variants, size.schedule, options.rng())
    notes = [
        f"{size.schedule.rounds} round(s) of {len(setups)} kills; task ttl {RECLAIM_TTL:g} s,"
        f" `dlock_reclaim_grace` {GRACE:g} s (the default)."
    ]
    return build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=None,
        variants=variants,
        timings=timings,
        ratios=ratios(size.heartbeats),
        targets=[],
        notes=notes,
        tables=[_table(setups, kills)],
        rows=False,
        tail_ratios=False,
    )


SCENARIO = Scenario(name="reclaim", title="Scenario 6: SIGKILL of the whole worker to its lock free", run=run)


def _kill_op(stack: workers.Stack, setup: Setup, rng: random.Random, into: list[Reclaimed]) -> Callable[[], int]:
    """One kill of ``setup`` after a random delay from ``rng``, kept in ``into``; returns kill to free in ns."""

    def op() -> int:
        reclaimed = kill_and_wait(stack, setup, rng.uniform(0, KILL_SPREAD))
        into.append(reclaimed)
        return reclaimed.free_ns

    return op


def _table(setups: Sequence[Setup], kills: Mapping[str, list[Reclaimed]]) -> Table:
    """Kill to free by round, its median, the bound, and the lease left at the kill."""
    rows = []
    for setup in setups:
        seconds = [kill.free_ns / 1e9 for kill in kills[setup.key]]
        rows.append(
            [
                setup.label,
                f"{setup.heartbeat:g} s",
                f"{GRACE:g} s" if setup.reclaim else "–",
                " / ".join(f"{value:.2f}" for value in seconds),
                f"{statistics.median(seconds):.2f}",
                f"{setup.bound:.1f}" + ("" if setup.reclaim else " (the ttl)"),
                f"{statistics.median(kill.lease_left_ms for kill in kills[setup.key]) / 1000:.2f}",
            ]
        )
    return Table(
        "### Kill to free",
        [
            "Variant",
            "Heartbeat",
            "Grace",
            "Kill to free (s), by round",
            "Median (s)",
            "Bound (s)",
            "Lease left at the kill (s), median",
        ],
        rows,
    )
