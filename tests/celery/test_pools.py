"""Single-flight tasks under a real ``celery worker`` of every pool: prefork, solo, threads, gevent, eventlet.

One broker (with the results and the recorder) and three lock nodes serve
the whole module; each pool gets one worker (``-E``, its own queue) that its
tests share, and the next pool's worker starts once the last one has
stopped.  The worker runs :mod:`pools_app`.  Three nodes, not one, so that
every acquire waits on several sockets at once: under eventlet, whose green
``select`` has no ``poll``, that is the path of
:class:`celery_dlock.lock.nodes.Readiness` that falls back to ``select()``.

For each pool: a contended key with ``on_busy="requeue"`` (every call runs
exactly once, never two at a time, and succeeds), a failing body (its lock
is released and the next call runs at once), ``on_busy="skip"`` (a call
while the key is held is skipped with :class:`~celery_dlock.TaskSkipped`),
and a CPU-bound body that runs past its ttl without yielding (kept where the
watchdog is a real thread; lost and reported at the release under gevent and
eventlet, whose watchdog is a green thread that such a body starves).
``docs/pools.md`` sums these up.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import states
from celery.result import AsyncResult
from support.critical_sections import Section
from support.event_receiver import receiving
from support.redis_servers import RedisCluster
from support.worker_stack import KEY_PREFIX, Stack, new_key
from support.workers import CeleryWorker

from celery_dlock import Redlock, TaskSkipped
from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.worker, pytest.mark.multinode, pytest.mark.timeout(120)]

#: Each pool and the concurrency it runs with: solo runs one task at a time.
POOLS = {"prefork": 4, "solo": 1, "threads": 4, "gevent": 4, "eventlet": 4}

#: The pools whose tasks and watchdog are green threads of one OS thread.
GREEN = frozenset({"gevent", "eventlet"})

#: How many calls the contended key gets.
CALLS = 8

#: How long the CPU-bound body spins: past ``pa.spin``'s ttl of 1 s.
SPIN_SECONDS = 1.5


@dataclass
class Pooled:
    """The module's stack and the worker of one pool, consuming a queue of its own."""

    stack: Stack
    worker: CeleryWorker
    pool: str
    queue: str

    @property
    def concurrency(self) -> int:
        return POOLS[self.pool]

    def send(self, name: str, *args: Any) -> AsyncResult:
        return self.stack.send(name, *args, queue=self.queue)

    def result(self, sent: AsyncResult, timeout: float = 20.0) -> AsyncResult:
        return self.stack.result(sent, timeout)

    def logs(self) -> str:
        return f"pool={self.pool}\n{self.stack.logs(60)}"


# -- fixtures: one broker and three lock nodes; one worker per pool ---------------------


@pytest.fixture(scope="module")
def lock_nodes() -> Iterator[RedisCluster]:
    cluster = RedisCluster().start(3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def lock_clients(lock_nodes: RedisCluster) -> list[redis.Redis]:
    """One client per lock node, to look at the locks."""
    return lock_nodes.clients()


@pytest.fixture(scope="module")
def stack(make_stack: Any, lock_nodes: RedisCluster) -> Stack:
    made: Stack = make_stack(lock_urls=lock_nodes.urls)
    return made


@pytest.fixture(scope="module")
def redlock(stack: Stack) -> Iterator[Redlock]:
    """The test's own client of the lock nodes: an outside holder, and the counters."""
    client = Redlock(stack.lock_urls)
    yield client
    client.close()


@pytest.fixture(scope="module", params=list(POOLS))
def pooled(request: pytest.FixtureRequest, stack: Stack) -> Iterator[Pooled]:
    pool: str = request.param
    queue = f"pools-{pool}-{uuid.uuid4().hex[:6]}"
    worker = CeleryWorker(
        broker_url=stack.broker.url,
        lock_urls=stack.lock_urls,
        recorder_url=stack.recorder_url,
        app_module="pools_app",
        pool=pool,
        concurrency=POOLS[pool],
        queues=[queue],
        extra_args=["-E"],
    )
    stack.workers.append(worker)  # so that a failed start still shows in stack.logs()
    worker.start()
    yield Pooled(stack, worker, pool, queue)
    worker.close()
    stack.workers.remove(worker)


@pytest.fixture(scope="module")
def task_events(stack: Stack) -> Iterator[list[dict[str, Any]]]:
    """Every task event the workers send from now on, as a real event receiver gets them."""
    with receiving(stack.app, name="pools-event-receiver") as seen:
        yield seen


# -- helpers ----------------------------------------------------------------------------


def lock_left(nodes: list[redis.Redis], key: str) -> list[int]:
    """The indices of the lock nodes that still hold the lock of ``key``."""
    return [index for index, node in enumerate(nodes) if node.exists(f"{KEY_PREFIX}lock:{key}")]


def counter(redlock: Redlock, task: str, event: str) -> int:
    return redlock.stats().get(task, {}).get(event, 0)


def assert_not_counted_lost(redlock: Redlock, task: str, released_before: int, lost_before: int) -> None:
    """Once the run's release is counted, no loss was: one process writes both, a loss first."""
    wait_until(lambda: counter(redlock, task, "released") > released_before, 5, message=f"{task}'s release count")
    assert counter(redlock, task, "lost") == lost_before


def lost_hooks(stack: Stack, task_id: str) -> list[dict[str, Any]]:
    found = [json.loads(raw) for raw in stack.recorder.lrange("lost", 0, -1)]
    return [line for line in found if line["id"] == task_id]


# -- a contended key, on_busy="requeue" -------------------------------------------------


def test_contended_key_every_call_runs_once_and_succeeds(
    pooled: Pooled, redlock: Redlock, lock_clients: list[redis.Redis]
) -> None:
    stack = pooled.stack
    key = new_key(f"{pooled.pool}-requeue")
    requeued_before = counter(redlock, "pa.requeue_section", "requeued")
    # Held from outside at first, so that every pool (solo too, which runs one
    # body at a time) meets a busy key and requeues; the worker's own
    # concurrency contends for it afterwards.
    holder = redlock.acquire(key, ttl=10)
    entered = time.monotonic_ns()
    sent = [pooled.send("pa.requeue_section", key, 0.03) for _ in range(CALLS)]
    wait_until(
        lambda: counter(redlock, "pa.requeue_section", "requeued") > requeued_before,
        10,
        message=lambda: f"a requeue of a busy call\n{pooled.logs()}",
    )
    left = time.monotonic_ns()
    assert holder.release()
    results = [pooled.result(r, timeout=30) for r in sent]

    assert [r.state for r in results] == [states.SUCCESS] * CALLS, ([r.result for r in results], pooled.logs())
    runs = stack.runs(key=key)
    assert Counter(run["id"] for run in runs) == Counter({r.id: 1 for r in sent})  # each ran exactly once
    assert any(run["requeues"] > 0 for run in runs)
    sections = stack.sections(key)
    assert len(sections) == CALLS
    outside = Section(key, holder.token, entered, left)
    assert overlaps([outside, *sections]) == []
    assert falling_tokens([outside, *sections]) == []
    assert sorted(r.result for r in results) == sorted(s.token for s in sections)
    assert stack.counter(key) == CALLS  # no lost read-modify-write update
    wait_until(lambda: not lock_left(lock_clients, key), 5, message=f"the lock of {key!r} to be gone from every node")


def test_contended_key_with_on_busy_wait_every_call_runs_once(
    pooled: Pooled, redlock: Redlock, lock_clients: list[redis.Redis]
) -> None:
    stack = pooled.stack
    key = new_key(f"{pooled.pool}-wait")
    busy_before = counter(redlock, "pa.wait_section", "busy")
    holder = redlock.acquire(key, ttl=10)  # every call blocks at first, woken by this release
    entered = time.monotonic_ns()
    sent = [pooled.send("pa.wait_section", key, 0.03) for _ in range(CALLS)]
    wait_until(
        lambda: counter(redlock, "pa.wait_section", "busy") > busy_before,
        10,
        message=lambda: f"a call to find the key busy\n{pooled.logs()}",
    )
    left = time.monotonic_ns()
    assert holder.release()
    results = [pooled.result(r, timeout=30) for r in sent]

    assert [r.state for r in results] == [states.SUCCESS] * CALLS, ([r.result for r in results], pooled.logs())
    runs = stack.runs(key=key)
    assert Counter(run["id"] for run in runs) == Counter({r.id: 1 for r in sent})
    assert all(run["requeues"] == 0 for run in runs)  # they waited in the worker, none went back to the broker
    sections = stack.sections(key)
    assert len(sections) == CALLS
    outside = Section(key, holder.token, entered, left)
    assert overlaps([outside, *sections]) == []
    assert falling_tokens([outside, *sections]) == []
    assert stack.counter(key) == CALLS
    wait_until(lambda: not lock_left(lock_clients, key), 5, message=f"the lock of {key!r} to be gone from every node")


# -- the failure path releases ------------------------------------------------------------


def test_a_failing_body_releases_and_the_next_call_runs_at_once(
    pooled: Pooled, lock_clients: list[redis.Redis]
) -> None:
    stack = pooled.stack
    key = new_key(f"{pooled.pool}-fail")
    failed = pooled.result(pooled.send("pa.failing_section", key))

    assert failed.state == states.FAILURE, (failed.state, failed.result, pooled.logs())
    assert isinstance(failed.result, ValueError), (failed.result, pooled.logs())
    (run,) = stack.runs(key=key)
    assert len(stack.sections(key)) == 1  # the body ended, by its exception

    # Sent at once: with on_busy="skip", a lock left behind (ttl=30) would skip it.
    started = time.monotonic()
    following = pooled.result(pooled.send("pa.skip_section", key), timeout=10)
    assert following.state == states.SUCCESS, (following.state, following.result, pooled.logs())
    assert following.result > run["token"]
    assert time.monotonic() - started < 5
    wait_until(lambda: not lock_left(lock_clients, key), 5, message=f"the lock of {key!r} to be gone from every node")


# -- on_busy="skip" -------------------------------------------------------------------------


def test_skip_policy_a_call_while_the_key_is_held_is_skipped(pooled: Pooled, redlock: Redlock) -> None:
    stack = pooled.stack
    key = new_key(f"{pooled.pool}-skip")
    flag = f"release:{key}"
    skipped_before = counter(redlock, "pa.skip_section", "skipped")
    holder = None
    first = None
    if pooled.concurrency > 1:
        first = pooled.send("pa.skip_section", key, flag)
        stack.wait_run(first.id)
    else:  # solo runs one task at a time: the holder is outside the worker
        holder = redlock.acquire(key, ttl=30)

    started = time.monotonic()
    second = pooled.result(pooled.send("pa.skip_section", key), timeout=10)
    skipped_after = time.monotonic() - started
    stack.recorder.set(flag, 1)
    if holder is not None:
        assert holder.release()

    assert second.state == states.FAILURE, (second.state, second.result, pooled.logs())
    assert isinstance(second.result, TaskSkipped), (second.result, pooled.logs())
    assert skipped_after < 5  # at once, not after the holder
    assert stack.runs(task_id=second.id) == []
    wait_until(lambda: counter(redlock, "pa.skip_section", "skipped") == skipped_before + 1, 5)
    if first is not None:
        done = pooled.result(first)
        assert done.state == states.SUCCESS, (done.state, done.result, pooled.logs())
        assert [run["id"] for run in stack.runs(key=key)] == [first.id]


# -- a CPU-bound body past its ttl ---------------------------------------------------------


def test_a_cpu_bound_body_past_its_ttl(
    pooled: Pooled, redlock: Redlock, lock_clients: list[redis.Redis], task_events: list[dict[str, Any]]
) -> None:
    """Kept by a real watchdog thread; under gevent and eventlet, lost, and reported at the release.

    Under gevent and eventlet a second run yields once after the lapse: the
    watchdog's green thread then runs, and reports the loss mid-body.
    """
    stack = pooled.stack
    key = new_key(f"{pooled.pool}-spin")
    lost_before = counter(redlock, "pa.spin", "lost")
    released_before = counter(redlock, "pa.spin", "released")
    spun = pooled.result(pooled.send("pa.spin", key, SPIN_SECONDS), timeout=30)

    assert spun.state == states.SUCCESS, (spun.state, spun.result, pooled.logs())
    (run,) = stack.runs(task_id=spun.id)
    warning = re.compile(rf"WARNING/[^\]]*\] lock '{re.escape(key)}' \(token {run['token']}\) lost: ")
    if pooled.pool in GREEN:
        # The body never yielded, so the watchdog's green thread never ran:
        # no renewal, and the loss is found and reported by the release.
        assert spun.result["lost"] is True, spun.result  # the lease is timed locally: the body can tell
        assert spun.result["ensure_held"] is False, spun.result
        assert spun.result["extensions"] == 0, spun.result
        hooks = lost_hooks(stack, spun.id)
        assert len(hooks) == 1, (hooks, pooled.logs())  # on_lock_lost ran, once, by the time the result is in
        (hook,) = hooks
        assert hook["key"] == key
        assert hook["token"] == run["token"]
        assert hook["type"] == "LockLost"
        assert "lapsed before its release" in hook["error"], hook
        wait_until(lambda: warning.search(pooled.worker.log), 5, message=lambda: f"the WARNING\n{pooled.logs()}")
        wait_until(lambda: counter(redlock, "pa.spin", "lost") == lost_before + 1, 5, message="the lost counter")
        event = wait_until(
            lambda: next((e for e in task_events if e["type"] == "task-lock-lost" and e["uuid"] == spun.id), None),
            10,
            message=lambda: f"a task-lock-lost event for {spun.id}; have {[e['type'] for e in task_events]}",
        )
        assert event["key"] == key
        assert event["token"] == run["token"]
        assert "lapsed before its release" in event["reason"]
    else:
        # The watchdog is a real thread: the GIL lets it renew mid-spin.
        assert spun.result["lost"] is False, spun.result
        assert spun.result["ensure_held"] is True, spun.result
        assert spun.result["extensions"] >= 2, spun.result
        assert lost_hooks(stack, spun.id) == []
        assert_not_counted_lost(redlock, "pa.spin", released_before, lost_before)
        assert not warning.search(pooled.worker.log)

    wait_until(lambda: not lock_left(lock_clients, key), 5, message=f"the lock of {key!r} to be gone from every node")
    following = pooled.result(pooled.send("pa.skip_section", key), timeout=10)
    assert following.state == states.SUCCESS, (following.state, following.result, pooled.logs())

    if pooled.pool in GREEN:
        # A body that yields once after the lapse lets the watchdog run then:
        # it finds the lease over and reports the loss while the body is still in.
        again = pooled.result(pooled.send("pa.spin", key, SPIN_SECONDS, 0.2), timeout=30)
        assert again.state == states.SUCCESS, (again.state, again.result, pooled.logs())
        assert again.result["lost"] is True, again.result
        assert again.result["loss_recorded_in_body"] is True, (again.result, pooled.logs())
        # The watchdog then logs, counts, sends the event and calls the hook,
        # which may finish after the result is stored.
        (hook,) = wait_until(lambda: lost_hooks(stack, again.id), 5, message="the on_lock_lost hook")
        assert "lapsed before it was extended" in hook["error"], hook
        wait_until(lambda: counter(redlock, "pa.spin", "lost") == lost_before + 2, 5, message="the lost counter")


def test_a_yielding_body_past_its_ttl_keeps_its_lock(pooled: Pooled, redlock: Redlock) -> None:
    """Every pool's watchdog renews a body that sleeps in short steps, the green pools' too."""
    stack = pooled.stack
    key = new_key(f"{pooled.pool}-sleep")
    lost_before = counter(redlock, "pa.sleep_past_ttl", "lost")
    released_before = counter(redlock, "pa.sleep_past_ttl", "released")
    slept = pooled.result(pooled.send("pa.sleep_past_ttl", key, SPIN_SECONDS), timeout=30)

    assert slept.state == states.SUCCESS, (slept.state, slept.result, pooled.logs())
    assert slept.result["lost"] is False, slept.result
    assert slept.result["ensure_held"] is True, slept.result
    assert slept.result["extensions"] >= 2, slept.result  # renewed every ttl/3
    assert lost_hooks(stack, slept.id) == []
    assert_not_counted_lost(redlock, "pa.sleep_past_ttl", released_before, lost_before)
    assert f"lock '{key}'" not in pooled.worker.log
