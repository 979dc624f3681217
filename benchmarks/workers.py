"""Real ``celery worker`` runs for the worker benchmarks (drain, contention, reclaim).

The workers are :class:`celery_dlock.testing.worker_process.WorkerProcess`
(the one the tests' workers are built on too), running
:mod:`benchmarks.celery_app` with the prefork pool.  Each
:func:`drain` starts a fresh worker for one variant and measures it warm:

1. start the worker consuming only the warm-up queue, and wait for its
   ``ready`` line and all its pool processes;
2. run a few warm-up messages, so that every pool process has connected to
   Redis and loaded its scripts, then forget their records;
3. reset the servers' command statistics and fill the work queue, which no
   one consumes yet;
4. tell the worker to consume the work queue (remote control
   ``add_consumer``) and wait until every message's body has recorded its
   start and end;
5. kill the worker's process group, and delete its log unless
   ``DLOCK_TEST_KEEP_LOGS`` is set.

The drain time is from the first body's start to the last body's end, on
the monotonic clock all processes share.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from celery_dlock.testing.worker_process import ENV_KEEP_LOGS, WorkerProcess

from . import celery_app, servers
from .celery_app import RUNS, WARM_QUEUE, WORK_QUEUE, Urls

__all__ = ["Drained", "Stack", "discard", "drain", "new_worker", "stack"]

#: The repository, on the workers' import path for ``benchmarks.celery_app``.
_REPO = Path(__file__).resolve().parent.parent
#: The recorder is polled this often while a queue drains.
POLL_SECONDS = 0.05
#: Commands the benchmark itself sends to a server, left out of its counts.
_OWN_COMMANDS = frozenset({"config", "info"})


class Stack:
    """The three redis-servers of a worker benchmark, and a client of each.

    The clients have a 10 s socket timeout, for ``FLUSHALL`` and reads of
    long lists.
    """

    def __init__(
        self,
        broker: servers.RedisProcess,
        locks: servers.RedisProcess,
        recorder: servers.RedisProcess,
    ) -> None:
        self.urls = Urls(broker.url, locks.url, recorder.url)
        #: The servers' process ids, by role.
        self.pids = {
            "broker": _pid(broker),
            "lock server": _pid(locks),
            "recorder": _pid(recorder),
        }
        self.broker = broker.client(socket_timeout=10)
        self.locks = locks.client(socket_timeout=10)
        self.recorder = recorder.client(socket_timeout=10)

    def flush(self) -> None:
        """Empty every database of every server."""
        for client in (self.broker, self.locks, self.recorder):
            client.flushall()

    def reset_stats(self) -> None:
        """Zero the command statistics of the broker and the lock server."""
        for client in (self.broker, self.locks):
            client.config_resetstat()


def _pid(server: servers.RedisProcess) -> int:
    if server.proc is None:
        raise RuntimeError(f"{server!r} is not running")
    return server.proc.pid


@contextmanager
def stack() -> Iterator[Stack]:
    """Start a broker, a lock server and a recorder; all are killed on exit."""
    with servers.nodes(3) as cluster:
        yield Stack(broker=cluster[0], locks=cluster[1], recorder=cluster[2])


@dataclass(frozen=True)
class Drained:
    """What one worker run measured.

    Attributes:
        messages: Bodies that ran (one per message; requeues do not count).
        span_ns: From the first body's start to the last body's end.
        body_ns: The sum of the bodies' own durations.
        requeues: Lock-busy requeues, summed over the messages.
        fill_ns: How long publishing the messages took.
        lock_commands: Commands the lock server ran during fill and drain,
            by command name (commands inside scripts included).
        broker_commands: The same for the broker.
        cpu_ns: CPU time (user + system) spent during the drain, by process
            role: ``pool`` (all pool processes), ``worker`` (the main
            process), and each server.

    """

    messages: int
    span_ns: int
    body_ns: int
    requeues: int
    fill_ns: int
    lock_commands: Counter[str]
    broker_commands: Counter[str]
    cpu_ns: dict[str, int]

    @property
    def per_task_ns(self) -> int:
        """The drain time per message: the inverse of throughput."""
        return self.span_ns // self.messages

    @property
    def tasks_per_second(self) -> float:
        """Messages drained per second."""
        return self.messages * 1e9 / self.span_ns


def drain(
    stack: Stack,
    variant: str,
    *,
    messages: int,
    concurrency: int,
    hold: float = 0.0,
    timeout: float = 300.0,
    end_to_end: bool = False,
) -> Drained:
    """Measure one warm worker of ``variant`` draining ``messages`` messages.

    Each message's body sleeps ``hold`` seconds.  By default the queue is
    filled first and the span runs from the first body's start; with
    ``end_to_end`` the worker consumes while the messages are published, and
    the span runs from the first publish, so that publish-time locks count.
    Raises if the worker dies or the queue is not drained within ``timeout`` seconds.
    """
    stack.flush()
    app, task = celery_app.build(variant, stack.urls)
    queues = [WARM_QUEUE, WORK_QUEUE] if end_to_end else [WARM_QUEUE]
    worker = new_worker(stack, variant, concurrency=concurrency, queues=queues, name=f"bench-{variant}-c{concurrency}")
    runs = stack.recorder
    try:
        worker.start()
        warmup = 2 * concurrency
        for n in range(warmup):
            task.apply_async((-1 - n, 0.0), queue=WARM_QUEUE)
        _wait_for_runs(runs, warmup, worker, timeout=60)
        runs.delete(RUNS)
        stack.reset_stats()

        roles = {"worker": [worker.pid], "pool": worker.pool_pids()}
        roles.update({role: [pid] for role, pid in stack.pids.items()})
        if end_to_end:
            cpu_before = _cpu_ns(roles)
        published_at = time.monotonic_ns()
        for n in range(messages):
            task.apply_async((n, hold), queue=WORK_QUEUE)
        fill_ns = time.monotonic_ns() - published_at

        if not end_to_end:
            cpu_before = _cpu_ns(roles)
            replies = app.control.add_consumer(WORK_QUEUE, destination=[worker.hostname], reply=True, timeout=10)
            if not replies:
                raise RuntimeError(f"{worker!r} did not answer add_consumer:\n{worker.log_tail()}")
        _wait_for_runs(runs, messages, worker, timeout=timeout)
        cpu_after = _cpu_ns(roles)
        records = [line.split() for line in runs.lrange(RUNS, 0, -1)]
        lock_commands = _command_counts(stack.locks)
        broker_commands = _command_counts(stack.broker)
    finally:
        discard(worker)
        app.close()
    starts = [int(record[0]) for record in records]
    ends = [int(record[1]) for record in records]
    return Drained(
        messages=len(records),
        span_ns=max(ends) - (published_at if end_to_end else min(starts)),
        body_ns=sum(end - start for start, end in zip(starts, ends, strict=True)),
        requeues=sum(int(record[2]) for record in records),
        fill_ns=fill_ns,
        lock_commands=lock_commands,
        broker_commands=broker_commands,
        cpu_ns={role: cpu_after[role] - cpu_before[role] for role in roles},
    )


def new_worker(
    stack: Stack,
    variant: str,
    *,
    concurrency: int,
    queues: Sequence[str],
    name: str,
    heartbeat: float | None = None,
) -> WorkerProcess:
    """A prefork worker of ``variant`` on ``stack``'s servers, not started yet.

    It consumes ``queues``; ``heartbeat`` is its ``--heartbeat-interval``
    (by default it sends none).
    """
    return WorkerProcess(
        "benchmarks.celery_app",
        concurrency=concurrency,
        queues=queues,
        env={celery_app.ENV_VARIANT: variant, celery_app.ENV_URLS: stack.urls.encode()},
        pythonpath=[_REPO],
        name=name,
        heartbeat=heartbeat,
    )


def discard(worker: WorkerProcess) -> None:
    """Kill the worker's process group, and delete its log unless ``DLOCK_TEST_KEEP_LOGS`` is set."""
    worker.kill()
    if not os.environ.get(ENV_KEEP_LOGS):
        shutil.rmtree(worker.dir, ignore_errors=True)


def _wait_for_runs(runs: redis.Redis, count: int, worker: WorkerProcess, *, timeout: float) -> None:
    """Poll the recorder until ``count`` bodies have recorded themselves."""
    deadline = time.monotonic() + timeout
    while True:
        done = runs.llen(RUNS)
        if done >= count:
            return
        if not worker.running:
            raise RuntimeError(f"{worker!r} died after {done} of {count} runs:\n{worker.log_tail()}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{worker!r}: only {done} of {count} runs after {timeout:.0f} s:\n{worker.log_tail()}")
        time.sleep(POLL_SECONDS)


def _cpu_ns(roles: dict[str, list[int]]) -> dict[str, int]:
    """CPU time used so far by the processes of each role, from ``/proc``."""
    return {role: sum(_process_cpu_ns(pid) for pid in pids) for role, pids in roles.items()}


def _process_cpu_ns(pid: int) -> int:
    """User plus system CPU time of ``pid`` (10 ms resolution, typically)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # "pid (comm) state ppid ...": utime and stime are the 12th and 13th
    # fields after the command name, which may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _command_counts(client: redis.Redis) -> Counter[str]:
    """Calls per command since the last reset, without the benchmark's own."""
    counts: Counter[str] = Counter()
    for name, stats in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_").lower()
        if command not in _OWN_COMMANDS:
            counts[command] = int(stats["calls"])
    return counts
