"""Scenario 3: worker drain throughput with uncontended single-flight tasks.

What single-flight costs a worker when it never blocks anything: a queue
of trivial tasks with distinct arguments, drained by a real prefork worker,
plain and under each library.  Ours does all its work in the worker (two
round trips per task: acquire, release); the anchors lock when the message
is published and unlock in the worker, so their publish cost is shown too.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import workers
from .harness import Schedule, Variant, run_interleaved
from .metrics_cost import metrics_cost_ns, summary
from .optional import skipped_note
from .scenario import RunOptions, Scenario, ScenarioResult, Table, build_result
from .stats import Ratio, Target

__all__ = ["FULL", "QUICK", "SCENARIO", "Size", "run"]


@dataclass(frozen=True)
class Size:
    """How big a drain run is.

    Attributes:
        schedule: Rounds; each round drains once per variant and concurrency.
        messages: Messages per drain.
        concurrencies: The worker pool sizes measured.
        probe: Rounds and runs per round of the in-process metrics cost
            (:mod:`benchmarks.metrics_cost`).

    """

    schedule: Schedule
    messages: int
    concurrencies: tuple[int, ...]
    probe: tuple[int, int]


#: About four minutes: 70 worker runs of 3 to 4 s each.
#: The metrics probe: 41 rounds of 20 000 runs, about 15 s.
FULL = Size(Schedule(rounds=7, warmup=0, batch=1), messages=2000, concurrencies=(2, 4), probe=(41, 20_000))
#: Five worker runs of about a second, and a probe of about a second.
QUICK = Size(Schedule(rounds=1, warmup=0, batch=1), messages=200, concurrencies=(2,), probe=(5, 2_000))

#: Library families, in table order, with the module each needs.
FAMILIES: Mapping[str, tuple[str, str | None]] = {
    "plain": ("plain task", None),
    "floor": ("floor in the body: SET NX PX, then compare-and-delete (redis-py)", None),
    "ours": ("ours: @single_flight (argument hash, on_busy=requeue)", "celery_dlock"),
    "ours-metrics": ("ours + metrics: the same, dlock_metrics=True", "celery_dlock"),
    "ours-history": ("ours + history: the same, dlock_history=100", "celery_dlock"),
    "celery-once": ("celery-once: QueueOnce", "celery_once"),
    "celery-singleton": ("celery-singleton: Singleton", "celery_singleton"),
    "celery-heimdall": ("celery-heimdall: HeimdallTask, unique", "celery_heimdall"),
}

ANCHORS = ("celery-once", "celery-singleton", "celery-heimdall")

#: The families also drained end to end (publishing while the worker consumes), at the first concurrency.
END_TO_END = ("plain", "ours", *ANCHORS)

#: The families a quick run drains, one of each kind: enough to show every code path runs.
QUICK_FAMILIES = ("plain", "floor", "ours", "celery-once")

#: The suffix of an end-to-end family's name.
E2E = "+e2e"

#: Ours must drain at least this share of the plain task's rate.
PLAIN_SHARE = 0.95

#: Ours with ``dlock_metrics`` on must drain at least this share of ours' rate.
METRICS_SHARE = 0.99

METHOD = """\
A queue of M messages of one trivial task (its body reads the clock twice
and pushes one line to a recorder redis-server), each with distinct
arguments, is drained by a real `celery worker -P prefork` at the given
concurrency.  Each run starts a fresh worker for one variant and waits
until it is ready and its pool processes exist; a few warm-up messages run
on another queue, so every pool process has connected and loaded its
scripts; then the work queue is filled while no one consumes it, the worker
is told to consume it (remote control `add_consumer`), and the drain time
is from the first body's start to the last body's end (monotonic clock,
shared by all processes).  Broker, lock server and recorder are three
spawned redis-servers; each library has its own database on the lock
server.  Nothing is pinned: the worker, its pool and the servers share the
machine's CPUs.  The worker logs at INFO (for its `ready` line) but the
per-task lines are off, as at the default WARNING level.

* **plain**: `@app.task(bind=True)`.
* **floor in the body**: a plain task whose body takes the least correct
  lock itself with redis-py: `SET key token NX PX` before, and `EVALSHA` of
  a compare-and-delete after, 2 round trips: the physical reference for a
  lock taken in the worker.
* **ours**: `@single_flight` (key = hash of the arguments, `on_busy="requeue"`,
  ttl 30 s auto-extended by the watchdog) under `@app.task`: acquire and
  release in the worker, one round trip each.
* **ours + metrics**: the same with `dlock_metrics=True`: each run adds its
  wait and hold times to the in-process counters (no Redis command).
* **ours + history**: the same with `dlock_history=100`: each run's grant and
  release are sent as `XADD`s once a second, without waiting for replies.
* **celery-once**: `base=QueueOnce`, its Redis backend: a lock (`SET NX`) at
  publish, a `DEL` after the body.
* **celery-singleton**: `base=Singleton`: `SET NX` at publish, `DEL` on success.
* **celery-heimdall**: `base=HeimdallTask`, `heimdall={"unique": True}`: a lock
  at publish, checked again in the worker (`SET NX`, then `GET`+`TTL` when it
  finds its own publish-time lock), `DEL` after.  Run with
  `heimdall_unique_lock_blocking=False`: with the default, the worker's check
  polls for up to 1 s on the lock its own publish took, so every task
  waits about a second.

Variants and concurrencies are interleaved: every round drains once per
variant and concurrency, in a new random order.  Ratios are of throughput
(tasks/s), variant over variant; per-round ratios compare drains of the
same round, and the targets are judged on their median, since drains side
by side share whatever else the machine was doing.  CPU time per task is each process's user + system time
(`/proc/<pid>/stat`, 10 ms ticks) over the drain, divided by M; the
anchors' publish-time locking is in the publisher, not in these columns.

**End to end** (plain, ours and the anchors, at the first concurrency): the
worker consumes the work queue from the start, and the time is from the
first publish to the last body's end, so that the anchors' publish-time
locks count.
"""


def key(family: str, concurrency: int) -> str:
    """The variant key of ``family`` at ``concurrency``, such as ``ours-c2``."""
    return f"{family}-c{concurrency}"


def ratios(concurrencies: Sequence[int]) -> list[Ratio]:
    """Throughput of ours over plain and over each anchor.

    Samples are drain times per task, so ``plain / ours`` of them is ours'
    throughput over plain's.
    """
    found = []
    for c in concurrencies:
        found.append(Ratio(f"ours / plain, c={c} (tasks/s)", key("plain", c), key("ours", c)))
        found.append(Ratio(f"ours / floor in the body, c={c} (tasks/s)", key("floor", c), key("ours", c)))
        found.append(Ratio(f"ours + metrics / ours, c={c} (tasks/s)", key("ours", c), key("ours-metrics", c)))
        found.append(Ratio(f"ours + history / ours, c={c} (tasks/s)", key("ours", c), key("ours-history", c)))
        found += [Ratio(f"ours / {anchor}, c={c} (tasks/s)", key(anchor, c), key("ours", c)) for anchor in ANCHORS]
    c = concurrencies[0]
    found += [
        Ratio(f"ours / {other}, end to end, c={c} (tasks/s)", key(other + E2E, c), key("ours" + E2E, c))
        for other in END_TO_END
        if other != "ours"
    ]
    return found


def targets(concurrencies: Sequence[int]) -> list[Target]:
    """Ours at least :data:`PLAIN_SHARE` of plain, metrics costing at most 1%, and ahead of every anchor."""
    by_label = {ratio.label: ratio for ratio in ratios(concurrencies)}
    found = []
    for c in concurrencies:
        found.append(
            Target(
                f"ours + metrics within {1 - METRICS_SHARE:.0%} of ours, c={c}",
                by_label[f"ours + metrics / ours, c={c} (tasks/s)"],
                METRICS_SHARE,
                "at least",
                basis="rounds",
            )
        )
        found.append(
            Target(
                f"ours ahead of the floor in the body, c={c}",
                by_label[f"ours / floor in the body, c={c} (tasks/s)"],
                1.0,
                "at least",
                basis="rounds",
            )
        )
        found.append(
            Target(
                f"ours within {1 - PLAIN_SHARE:.0%} of plain, c={c}",
                by_label[f"ours / plain, c={c} (tasks/s)"],
                PLAIN_SHARE,
                "at least",
                basis="rounds",
            )
        )
        found += [
            Target(
                f"ours ahead of {anchor}, c={c}",
                by_label[f"ours / {anchor}, c={c} (tasks/s)"],
                1.0,
                "at least",
                basis="rounds",
            )
            for anchor in ANCHORS
        ]
    return found


def run(options: RunOptions) -> ScenarioResult:
    """Drain the queue with every variant, interleaved, and summarize."""
    size = QUICK if options.quick else FULL
    notes: list[str] = []
    runs: dict[str, list[workers.Drained]] = {}
    families = _installed(notes)
    if options.quick:
        families = [family for family in families if family in QUICK_FAMILIES]
    first = size.concurrencies[0]
    end_to_end = [family + E2E for family in END_TO_END if family in families]
    measured = [(family, c) for c in size.concurrencies for family in families]
    measured += [(family, first) for family in end_to_end]
    with workers.stack() as servers:
        variants = [
            Variant(
                key(family, c),
                f"{_label(family)}, c={c}",
                family,
                1,
                _drain_op(servers, family, c, size.messages, runs.setdefault(key(family, c), [])),
                self_timed=True,
            )
            for family, c in measured
        ]
        timings = run_interleaved(variants, size.schedule, options.rng())
        costs = metrics_cost_ns(servers.urls.locks_db("ours"), rounds=size.probe[0], runs=size.probe[1])
    tables = [_table(f"### Throughput at concurrency {c}", c, families, runs) for c in size.concurrencies]
    tables.append(_cpu_table(size.concurrencies, families, runs))
    if end_to_end:
        heading = f"### End to end: publish and drain together, concurrency {first}"
        tables.append(_table(heading, first, end_to_end, runs))
    if "ours" in families:
        tables.append(_metrics_cost_table(size.concurrencies, runs, costs))
    notes.append(
        f"M = {size.messages} messages per drain; {size.schedule.rounds} round(s) of"
        f" {len(variants)} drains (every variant at concurrency"
        f" {', '.join(map(str, size.concurrencies))})."
    )
    return build_result(
        scenario=SCENARIO,
        method=METHOD,
        schedule=None,
        variants=variants,
        timings=timings,
        ratios=ratios(size.concurrencies),
        targets=targets(size.concurrencies),
        notes=notes,
        tables=tables,
        rows=False,
        tail_ratios=False,
    )


SCENARIO = Scenario(name="drain", title="Scenario 3: worker drain throughput", run=run)


def _installed(notes: list[str]) -> list[str]:
    """The families whose library is installed; the others are noted."""
    found = []
    for family, (_, module) in FAMILIES.items():
        if module is None or importlib.util.find_spec(module) is not None:
            found.append(family)
        else:
            notes.append(skipped_note(family))
    return found


def _drain_op(
    servers: workers.Stack,
    family: str,
    concurrency: int,
    messages: int,
    into: list[workers.Drained],
) -> Callable[[], int]:
    """One drain of ``family``'s worker, kept in ``into``; returns ns per task (end to end for a :data:`E2E` family)."""
    variant = family.removesuffix(E2E)
    end_to_end = variant != family

    def op() -> int:
        drained = workers.drain(servers, variant, messages=messages, concurrency=concurrency, end_to_end=end_to_end)
        if drained.messages != messages:
            raise RuntimeError(f"{family}: {drained.messages} bodies ran for {messages} messages")
        into.append(drained)
        return drained.per_task_ns

    return op


def _metrics_cost_table(
    concurrencies: Sequence[int], runs: Mapping[str, list[workers.Drained]], costs: dict[bool, list[float]]
) -> Table:
    """The CPU ``dlock_metrics`` adds per task (in process), against ours' whole CPU per task in the drain."""
    rows = []
    for c in concurrencies:
        ours = statistics.median(sum(d.cpu_ns.values()) / d.messages for d in runs[key("ours", c)])
        rows.append([f"ours, c={c}", *summary(costs, ours)])
    return Table(
        f"### What dlock_metrics adds per task: CPU in process ({len(costs[True])} rounds, interleaved)",
        [
            "Variant",
            "Metrics' added CPU/task, fastest rounds (µs)",
            "Median same-round difference (µs)",
            "Ours' CPU/task in the drain, all processes (µs)",
            "Added ÷ ours",
        ],
        rows,
    )


def _label(family: str) -> str:
    """How tables name ``family``."""
    variant = family.removesuffix(E2E)
    return FAMILIES[variant][0] + (", end to end" if variant != family else "")


def _table(heading: str, concurrency: int, families: Sequence[str], runs: Mapping[str, list[workers.Drained]]) -> Table:
    """Throughput per round, its median, the same-round ratio to the first family (plain), and costs."""
    plain = runs[key(families[0], concurrency)]
    rows = []
    for family in families:
        drained = runs[key(family, concurrency)]
        rates = [d.tasks_per_second for d in drained]
        to_plain = [d.tasks_per_second / p.tasks_per_second for d, p in zip(drained, plain, strict=True)]
        rows.append(
            [
                _label(family),
                " / ".join(f"{rate:.0f}" for rate in rates),
                f"{statistics.median(rates):.0f}",
                " / ".join(f"{ratio:.2f}" for ratio in to_plain),
                f"{statistics.median(to_plain):.2f}x",
                f"{statistics.median(d.messages * 1e9 / d.fill_ns for d in drained):.0f}",
                f"{statistics.median(d.lock_commands.total() / d.messages for d in drained):.1f}",
            ]
        )
    return Table(
        heading,
        [
            "Variant",
            "Tasks/s, by round",
            "Median tasks/s",
            "÷ plain, same round",
            "÷ plain, median",
            "Publish msgs/s (median)",
            "Lock-server commands/task",
        ],
        rows,
    )


#: The process roles of the CPU table, in column order.
CPU_ROLES = ("pool", "worker", "broker", "lock server", "recorder")


def _cpu_table(
    concurrencies: Sequence[int],
    families: Sequence[str],
    runs: Mapping[str, list[workers.Drained]],
) -> Table:
    """CPU time per task by process, the median over rounds, in microseconds.

    Unlike the drain time, CPU time is not inflated by other processes
    taking turns on the CPUs, so it shows where a variant's cost goes even
    on a busy machine.
    """
    rows = []
    for c in concurrencies:
        plain = runs[key("plain", c)]
        for family in families:
            drained = runs[key(family, c)]
            cells = [f"{FAMILIES[family][0].split(':')[0]}, c={c}"]
            cells += [
                f"{statistics.median(d.cpu_ns[role] / d.messages for d in drained) / 1000:.0f}" for role in CPU_ROLES
            ]
            totals = [sum(d.cpu_ns.values()) / d.messages for d in drained]
            to_plain = [total * p.messages / sum(p.cpu_ns.values()) for total, p in zip(totals, plain, strict=True)]
            cells += [
                f"{statistics.median(totals) / 1000:.0f}",
                f"{statistics.median(to_plain):.2f}x",
            ]
            rows.append(cells)
    return Table(
        "### CPU time per task during the drain (µs, median over rounds)",
        [
            "Variant",
            "Pool processes",
            "Worker main process",
            "Broker",
            "Lock server",
            "Recorder",
            "All",
            "All ÷ plain, same round",
        ],
        rows,
    )
