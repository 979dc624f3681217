"""Scenario 4: many messages on one key, drained by one prefork worker.

Every message wants the same key, so at most one body runs at a time and
the best possible drain takes the sum of the bodies.  How close each busy
policy comes, and how many Redis commands it spends per task, shows what
its way of waiting costs: requeueing with a countdown, blocking in the pool
process until the holder's release wakes it, or parking the message in the
key's handoff queue to be published at release.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import workers
from .celery_app import CONTENTION_SETTINGS
from .harness import Schedule, Variant, run_interleaved
from .scenario import RunOptions, Scenario, ScenarioResult, Table, build_result
from .stats import Ratio

__all__ = ["FULL", "QUICK", "SCENARIO", "Size", "run"]


@dataclass(frozen=True)
class Size:
    """How big a contention run is.

    Attributes:
        schedule: Rounds; each round drains once per policy.
        messages: Messages per drain, all on one key.
        concurrency: The worker's pool size.
        hold: Seconds each body sleeps.

    """

    schedule: Schedule
    messages: int
    concurrency: int
    hold: float


#: About a minute: 9 drains of 2 s or more of bodies.
FULL = Size(Schedule(rounds=3, warmup=0, batch=1), messages=200, concurrency=4, hold=0.01)
#: Three short drains.
QUICK = Size(Schedule(rounds=1, warmup=0, batch=1), messages=40, concurrency=4, hold=0.01)

#: The policies measured, by variant key (the worker app's variant name).
POLICIES: Mapping[str, str] = {
    "ours-requeue": 'on_busy="requeue"',
    "ours-wait": 'on_busy="wait"',
    "ours-queue": 'on_busy="queue"',
}

#: How many of the commands each drain used most to list per policy.
TOP_COMMANDS = 5

METHOD = f"""\
M messages of one task, all on ONE key (`@single_flight(key="bench:contended",
on_busy=...)`), each body sleeping ~10 ms, are drained by a real
`celery worker -P prefork` with concurrency 4, warm, as in scenario 3 (the
queue is filled first, then consumed).  Settings:
`dlock_requeue_delay={CONTENTION_SETTINGS["dlock_requeue_delay"]}`,
`dlock_requeue_max_delay={CONTENTION_SETTINGS["dlock_requeue_max_delay"]}`,
`dlock_max_requeues={CONTENTION_SETTINGS["dlock_max_requeues"]}`,
`dlock_wait_timeout={CONTENTION_SETTINGS["dlock_wait_timeout"]:.0f}`.

* **requeue**: a busy message is published again with a jittered, doubling
  countdown, and the pool process moves on.
* **wait**: the pool process blocks in `acquire` until the holder's release
  wakes it (pub/sub) or the wait times out.
* **queue**: a busy message is parked in the key's handoff queue on the lock
  server; the holder's release publishes the next one, which claims the key.

Drain time is from the first body's start to the last body's end; it is
divided by the sum of the bodies' own times (1.00 would be no gap at all
between owners).  Commands per task are every command the lock server (or
the broker) ran during fill and drain, from `INFO commandstats` reset just
before the fill, divided by M; commands called inside Lua scripts count,
as Redis counts them.  Policies are interleaved, a new random order per round.
"""

RATIOS = [
    Ratio("wait / requeue (drain time)", "ours-wait", "ours-requeue"),
    Ratio("queue / requeue (drain time)", "ours-queue", "ours-requeue"),
    Ratio("queue / wait (drain time)", "ours-queue", "ours-wait"),
]


def run(options: RunOptions) -> ScenarioResult:
    """Drain the one-key queue under every policy, interleaved, and summarize."""
    size = QUICK if options.quick else FULL
    runs: dict[str, list[workers.Drained]] = {}
    with workers.stack() as servers:
        variants = [
            Variant(
                policy,
                label,
                policy,
                1,
                _drain_op(servers, policy, size, runs.setdefault(policy, [])),
                self_timed=True,
            )
            for policy, label in POLICIES.items()
        ]
        timings = run_interleaved(variants, size.schedule, options.rng())
    notes = [
        (
            f"M = {size.messages} messages per drain, concurrency {size.concurrency},"
            f" bodies of {size.hold * 1000:.0f} ms; {size.schedule.rounds} round(s)."
        )
    ]
    return build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=None,
        variants=variants,
        timings=timings,
        ratios=RATIOS,
        targets=[],
        notes=notes,
        tables=[_table(runs), _commands_table(runs)],
        rows=False,
        tail_ratios=False,
    )


SCENARIO = Scenario(
    name="contention",
    title="Scenario 4: one contended key, drained by a worker",
    run=run,
)


def _drain_op(servers: workers.Stack, policy: str, size: Size, into: list[workers.Drained]) -> Callable[[], int]:
    """One drain under ``policy``, kept in ``into``; returns its drain time in ns."""

    def op() -> int:
        drained = workers.drain(
            servers,
            policy,
            messages=size.messages,
            concurrency=size.concurrency,
            hold=size.hold,
        )
        if drained.messages != size.messages:
            raise RuntimeError(f"{policy}: {drained.messages} bodies ran for {size.messages} messages")
        into.append(drained)
        return drained.span_ns

    return op


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _table(runs: Mapping[str, list[workers.Drained]]) -> Table:
    """Drain time, its overhead over the bodies, and commands per task."""
    rows = []
    for policy, label in POLICIES.items():
        drained = runs[policy]
        rows.append(
            [
                label,
                " / ".join(f"{d.span_ns / 1e9:.2f}" for d in drained),
                f"{_median([d.span_ns / 1e9 for d in drained]):.2f}",
                f"{_median([d.span_ns / d.body_ns for d in drained]):.2f}",
                f"{_median([d.lock_commands.total() / d.messages for d in drained]):.1f}",
                f"{_median([d.broker_commands.total() / d.messages for d in drained]):.1f}",
                f"{_median([d.requeues / d.messages for d in drained]):.1f}",
            ]
        )
    return Table(
        "### Drain",
        [
            "Policy",
            "Drain time (s), by round",
            "Median drain (s)",
            "Drain ÷ sum of bodies",
            "Lock-server commands/task",
            "Broker commands/task",
            "Requeues/task",
        ],
        rows,
    )


def _commands_table(runs: Mapping[str, list[workers.Drained]]) -> Table:
    """The lock server's busiest commands per task, in the median drain."""
    rows = []
    for policy, label in POLICIES.items():
        drained = sorted(runs[policy], key=lambda d: d.span_ns)[len(runs[policy]) // 2]
        top = drained.lock_commands.most_common(TOP_COMMANDS)
        rows.append(
            [
                label,
                ", ".join(f"{name} {calls / drained.messages:.2f}" for name, calls in top),
            ]
        )
    return Table(
        "### Lock-server commands per task (median drain)",
        ["Policy", "Busiest commands"],
        rows,
    )
