"""Lock scopes from publish to finish, on real workers and a real broker: Redis, and RabbitMQ.

Publishes go through a copy of ``scopes_app`` built in this process, so they
take the same publish-time locks a producer would; the bodies run in a
prefork ``celery worker``.  Messages that must wait are sent to a queue no
worker consumes until the test adds a consumer for it, so every published
count is exact.

Every test runs once per broker (the module fixture ``env``): a redis-server
of the test, and the shared RabbitMQ of ``test_amqp_worker`` (results and
locks stay on redis-servers), where every queue is one of the run's own,
deleted at the end.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from amqp.exceptions import MessageNacked
from celery.exceptions import OperationalError
from kombu import Queue
from redis.exceptions import OutOfMemoryError
from scopes_app import ENV_QUEUE, SHORT, build
from support.apps import AppUrls
from support.cli import run_dlock
from support.event_receiver import receiving
from support.redis_servers import RedisServer
from support.results import collect_results
from support.worker_stack import Stack, new_key, stacks
from test_amqp_worker import AmqpStack, new_queue, reachable_rabbitmq

from celery_dlock import AlreadyQueued, ConfigurationError, single_flight
from celery_dlock.celery.app_state import locks_for
from celery_dlock.celery.scopes import queue_key
from celery_dlock.ops.inspect import held_locks
from celery_dlock.testing.intervals import overlaps
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.redis_process import free_port

#: Concurrent publishes of one key.
BURST = 50


@pytest.fixture(scope="module", params=["redis", "amqp"])
def env(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, SimpleNamespace]]:
    """A prefork worker of ``scopes_app`` (concurrency 4) on the broker, and the publisher's copy of the app.

    Each broker's stack is closed before the next one starts, so that only
    one worker runs at a time.
    """
    amqp = queue = None
    with stacks() as make:
        if request.param == "amqp":
            amqp, queue = reachable_rabbitmq(), new_queue("scopes")
            stack = make(env={ENV_QUEUE: queue}, kind=AmqpStack, queue=queue)
        else:
            stack = make()
        worker = stack.worker(app_module="scopes_app", concurrency=4)
        tasks = build(AppUrls(stack.broker.url, stack.lock_urls, stack.recorder_url), amqp, queue)
        tasks.worker, tasks.amqp = worker, amqp
        try:
            yield stack, tasks
        finally:
            collect_results()
            tasks.app.close()


def held(stack: Stack, label: str = "held") -> str:
    """A queue of its own that no worker consumes (on RabbitMQ, deleted with the stack)."""
    return stack.new_queue(label) if isinstance(stack, AmqpStack) else new_key(label)


def held_queue(tasks: SimpleNamespace, name: str) -> None:
    """Let the worker consume ``name``, a queue it has ignored so far."""
    replies = tasks.app.control.add_consumer(name, reply=True, timeout=5, limit=1, destination=[tasks.worker.hostname])
    assert replies, "the worker did not answer add_consumer"


def burst(publish: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda _: publish(), range(BURST)))


def both_free(stack: Stack, key: str) -> bool:
    return not stack.lock_exists(key) and not stack.lock_exists(queue_key(key))


def counts(tasks: SimpleNamespace, task: Any) -> dict[str, int]:
    """The publish-time counters of ``task``: this process counts them, and reads its own at once."""
    found = locks_for(tasks.app).redlock.stats().get(task.name, {})
    return {event: found.get(event, 0) for event in ("queued", "duplicate", "dropped", "replaced")}


def counted(tasks: SimpleNamespace, task: Any, before: dict[str, int]) -> dict[str, int]:
    """What ``task`` counted since ``before``, leaving out the counters that did not move."""
    return {event: n - before[event] for event, n in counts(tasks, task).items() if n != before[event]}


# -- refused at decoration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"scope": "forever"}, "scope"),
        ({"on_duplicate": "ignore", "scope": "life"}, "on_duplicate"),
        ({"queue_ttl": -1, "scope": "life"}, "queue_ttl"),
        ({"scope": "queue", "on_busy": "wait"}, "on_busy"),
        ({"scope": "queue", "hold": True}, "hold"),
        ({"scope": "run", "on_duplicate": "raise"}, "on_duplicate"),
    ],
)
def test_bad_scope_options_are_refused_at_decoration(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{named}: "):
        single_flight(**options)


# -- each scope's bound under concurrent publishes ---------------------------------------------------


@pytest.mark.parametrize("scope", ["queue", "queue_run", "life"])
def test_fifty_publishes_of_one_key_queue_one_message(env: Any, scope: str) -> None:
    stack, tasks = env
    task, key, flag = getattr(tasks, scope), new_key(scope), new_key("flag")
    queue = held(stack)
    before = counts(tasks, task)
    results = burst(lambda: task.apply_async((key, 0, flag), queue=queue))
    ids = {result.id for result in results}
    assert len(ids) == 1, ids  # one published; the 49 others got its AsyncResult
    (first,) = ids
    assert stack.lock_exists(queue_key(key))
    (queued,) = [lock for lock in held_locks(tasks.app, queue_key(key)) if lock.key == queue_key(key)]
    assert (queued.kind, queued.task_id, queued.task) == ("queue", first, task.name)
    assert counted(tasks, task, before) == {"queued": 1, "duplicate": BURST - 1}
    held_queue(tasks, queue)
    stack.wait_run(first)
    wait_until(lambda: not stack.lock_exists(queue_key(key)), 10, message="the queue lock to go at start")

    second = task.apply_async((key, 1, None), queue=queue)
    more: list[Any] = []
    if scope == "life":
        # One queued-or-running: the running copy answers for the key.
        assert second.id == first
    else:
        # "queue" lets the next one wait (and, unlocked, run); "queue+run" lets one wait beside the run.
        assert second.id != first
        more = burst(lambda: task.apply_async((key, 2, None), queue=queue))
        if scope == "queue_run":
            assert {result.id for result in more} == {second.id}
    stack.recorder.set(flag, 1)
    published = {first, second.id, *(result.id for result in more)}
    for task_id in published:
        assert stack.result(tasks.app.AsyncResult(task_id)).successful()
    wait_until(lambda: both_free(stack, key), 10, message="the key to come free")
    runs = stack.runs(key=key)
    # Every message published ran once, and nothing else ran.
    assert sorted(run["id"] for run in runs) == sorted(published)
    if scope != "queue":  # else as many as found the queue lock free while the burst ran
        assert len(published) == (1 if scope == "life" else 2)
    if scope != "queue":
        assert not overlaps(stack.sections(key))
    # Each publish either published a message (and took its queue lock) or was a duplicate.
    publishes = BURST + 1 + len(more)
    assert counted(tasks, task, before) == {"queued": len(published), "duplicate": publishes - len(published)}


# -- what a duplicate publish gets ------------------------------------------------------------------


def test_on_duplicate_raise_names_the_holder_and_drop_returns_none(env: Any) -> None:
    stack, tasks = env
    queue = held(stack)
    published, keys = [], []
    for raising, dropping in ((tasks.life_raise, tasks.life_drop), (tasks.queue_raise, tasks.queue_drop)):
        before = {task.name: counts(tasks, task) for task in (raising, dropping)}
        key = new_key("dup")
        first = raising.apply_async((key,), queue=queue)
        with pytest.raises(AlreadyQueued) as raised:
            raising.apply_async((key,), queue=queue)
        assert raised.value.task_id == first.id
        other = new_key("drop")
        kept = dropping.apply_async((other,), queue=queue)
        assert dropping.apply_async((other,), queue=queue) is None
        assert counted(tasks, raising, before[raising.name]) == {"queued": 1, "duplicate": 1}
        assert counted(tasks, dropping, before[dropping.name]) == {"queued": 1, "duplicate": 1, "dropped": 1}
        published += [first, kept]
        keys += [key, other]
    held_queue(tasks, queue)
    assert all(stack.result(result).successful() for result in published)
    # One run per key: the one published; neither the raised nor the dropped duplicate ran.
    assert [[run["id"] for run in stack.runs(key=key)] for key in keys] == [[result.id] for result in published]
    wait_until(lambda: all(both_free(stack, key) for key in keys), 10, message="the keys to come free")


def test_on_duplicate_replace_revokes_the_waiting_copy(env: Any) -> None:
    stack, tasks = env
    key, queue = new_key("replace"), held(stack)
    before = counts(tasks, tasks.replace)
    first = tasks.replace.apply_async((key, 1), queue=queue)
    second = tasks.replace.apply_async((key, 2), queue=queue)
    assert second.id != first.id
    (lock,) = [found for found in held_locks(tasks.app, queue_key(key)) if found.key == queue_key(key)]
    assert lock.task_id == second.id
    assert counted(tasks, tasks.replace, before) == {"queued": 2, "replaced": 1}
    held_queue(tasks, queue)
    assert stack.result(second).get()["n"] == 2
    wait_until(lambda: tasks.app.AsyncResult(first.id).state == "REVOKED", 10)
    assert [run["id"] for run in stack.runs(key=key)] == [second.id]
    wait_until(lambda: both_free(stack, key), 10)


def test_duplicate_and_replaced_events_reach_an_event_receiver(env: Any) -> None:
    """The publisher sends them where it sends ``task-sent`` events, naming the holder."""
    stack, tasks = env
    queue, key, other = held(stack), new_key("ev-dup"), new_key("ev-replace")
    tasks.app.conf.task_send_sent_event = True
    try:
        with receiving(tasks.app) as seen:
            first = tasks.life.apply_async((key,), queue=queue)
            assert tasks.life.apply_async((key,), queue=queue).id == first.id
            old = tasks.replace.apply_async((other, 1), queue=queue)
            new = tasks.replace.apply_async((other, 2), queue=queue)

            def of(type_: str, uuid: str) -> list[dict[str, Any]]:
                return [event for event in seen if event["type"] == type_ and event.get("uuid") == uuid]

            wait_until(lambda: of("task-duplicate", first.id) and of("task-replaced", old.id), 10)
    finally:
        tasks.app.conf.task_send_sent_event = False
    (duplicate,) = of("task-duplicate", first.id)
    assert (duplicate["key"], duplicate["action"]) == (key, "return")
    assert duplicate["duplicate"] not in (None, first.id)  # the id the turned-away publish would have had
    (replaced,) = of("task-replaced", old.id)
    assert (replaced["key"], replaced["replaced_by"]) == (other, new.id)
    assert not of("task-duplicate", old.id)  # a replace is no duplicate
    held_queue(tasks, queue)
    assert stack.result(first).successful() and stack.result(new).get()["n"] == 2
    assert [run["id"] for run in stack.runs(key=key)] == [first.id]
    assert [run["id"] for run in stack.runs(key=other)] == [new.id]
    wait_until(lambda: both_free(stack, key) and both_free(stack, other), 10)


# -- the queue lock never outlives its message -----------------------------------------------------


def test_revoked_before_start_frees_the_queue_lock(env: Any) -> None:
    stack, tasks = env
    key, queue = new_key("revoke"), held(stack)
    result = tasks.life.apply_async((key,), queue=queue)
    tasks.app.control.revoke(result.id)
    held_queue(tasks, queue)
    since = time.monotonic()
    assert stack.wait_lock_gone(queue_key(key), 10, since) < 5
    assert stack.runs(key=key) == []
    assert tasks.life.apply_async((key,), queue=held(stack)).id != result.id


def test_expires_bounds_the_queue_lock(env: Any) -> None:
    stack, tasks = env
    key = new_key("expires")
    started = time.monotonic()
    tasks.life.apply_async((key,), queue=held(stack), expires=1)
    assert 0 < stack.lock_pttl(queue_key(key)) <= 1000
    assert stack.wait_lock_gone(queue_key(key), 5, started) < 1.5


def test_a_lost_message_frees_the_key_after_countdown_or_eta_plus_queue_ttl(env: Any) -> None:
    """Sent where no worker will ever look: one with ``countdown=1``, one with an ``eta`` a second away."""
    stack, tasks = env
    queue, by_countdown, by_eta = held(stack, "nowhere"), new_key("lost"), new_key("lost-eta")
    started = time.monotonic()
    tasks.lost.apply_async((by_countdown,), queue=queue, countdown=1)
    tasks.lost.apply_async((by_eta,), queue=queue, eta=datetime.now(timezone.utc) + timedelta(seconds=1))
    for key in (by_countdown, by_eta):
        assert 1700 < stack.lock_pttl(queue_key(key)) <= (1 + SHORT) * 1000
    for key in (by_countdown, by_eta):
        assert 1 + SHORT - 0.3 < stack.wait_lock_gone(queue_key(key), 10, started) < 1 + SHORT + 0.5


def test_a_publish_to_an_unreachable_broker_frees_the_queue_lock_at_once(env: Any) -> None:
    stack, tasks = env
    port = free_port()  # nothing listens there
    if tasks.amqp:
        refused = build(
            AppUrls(stack.broker.url, stack.lock_urls, stack.recorder_url), f"amqp://guest:guest@127.0.0.1:{port}//"
        )
    else:
        refused = build(AppUrls(f"redis://127.0.0.1:{port}/0", stack.lock_urls, stack.recorder_url))
        refused.app.conf.result_backend = stack.broker.url  # only the broker is down
    # One connection attempt, at once, not kombu's retries over 2 s.
    refused.app.conf.broker_transport_options = {"max_retries": 1, "interval_start": 0, "interval_step": 0}
    key = new_key("unreachable")
    with pytest.raises(OperationalError):
        refused.life.apply_async((key,), retry=False)
    assert not stack.lock_exists(queue_key(key))
    refused.app.close()


def test_a_publish_the_broker_refuses_frees_the_queue_lock_at_once(env: Any) -> None:
    """The broker answers and says no: RabbitMQ nacks (a full queue that rejects publishes, with
    publisher confirms); a Redis broker out of memory refuses the write."""
    stack, tasks = env
    key = new_key("refused")
    before = counts(tasks, tasks.life)
    if tasks.amqp:
        refused = build(AppUrls(stack.broker.url, stack.lock_urls, stack.recorder_url), tasks.amqp)
        refused.app.conf.broker_transport_options = {"confirm_publish": True}
        name = stack.new_queue("full")
        queue: Any = Queue(name, routing_key=name, queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        with pytest.raises(OperationalError) as raised:
            refused.life.apply_async((key,), queue=queue, retry=False)
        assert isinstance(raised.value.__cause__, MessageNacked)
    else:
        full = RedisServer(["--maxmemory", "1"]).start()
        try:
            refused = build(AppUrls(full.url, stack.lock_urls, stack.recorder_url))
            refused.app.conf.result_backend = stack.broker.url
            with pytest.raises(OperationalError) as raised:
                refused.life.apply_async((key,), queue="full", retry=False)
            assert isinstance(raised.value.__cause__, OutOfMemoryError)
            assert full.client().dbsize() == 0
        finally:
            full.stop()
    assert not stack.lock_exists(queue_key(key))
    assert counted(tasks, tasks.life, before) == {}  # nothing published, nothing counted
    # The key is free for the next publish.
    assert tasks.life.apply_async((key,), queue=held(stack)).id
    refused.app.close()


def test_kill_9_of_the_worker_holding_a_life_lock_frees_it_within_its_ttl(env: Any) -> None:
    stack, tasks = env
    queue, key = held(stack, "doomed"), new_key("killed")
    doomed = stack.worker(app_module="scopes_app", concurrency=1, queues=[queue])
    result = tasks.life_short_ttl.apply_async((key, 0, new_key("never")), queue=queue)
    stack.wait_run(result.id)
    assert stack.lock_exists(key) and not stack.lock_exists(queue_key(key))
    assert tasks.life_short_ttl.apply_async((key,), queue=queue).id == result.id
    killed = time.monotonic()
    doomed.kill()
    assert stack.wait_lock_gone(key, 10, killed) < SHORT + 0.5
    again = tasks.life_short_ttl.apply_async((key,), queue=held(stack))
    assert again.id != result.id


def test_self_retry_keeps_its_own_lock_and_never_collides(env: Any) -> None:
    stack, tasks = env
    key, flag = new_key("retry"), new_key("flag")
    result = tasks.life_retry.delay(key, 0, flag)
    stack.wait_run(result.id)
    with pytest.raises(AlreadyQueued) as running:
        tasks.life_retry.delay(key)
    assert running.value.task_id == result.id
    stack.recorder.set(flag, 1)
    # The retry is queued under the same id with the queue lock; a duplicate still meets it.
    wait_until(lambda: stack.lock_exists(queue_key(key)) or len(stack.runs(task_id=result.id)) == 2, 10)
    assert stack.result(result).get()["retries"] == 1
    runs = stack.runs(key=key)
    assert [(run["id"], run["retries"]) for run in runs] == [(result.id, 0), (result.id, 1)]
    assert not overlaps(stack.sections(key))
    wait_until(lambda: both_free(stack, key), 10)


def test_a_life_run_publishing_its_own_key_does_not_collide_with_its_run_lock(env: Any) -> None:
    """``self.apply_async`` inside a ``"life"`` run: a new message, which waits for the run to end."""
    stack, tasks = env
    key, flag = new_key("again"), new_key("flag")
    parent = tasks.life_again.delay(key, 0, flag)
    stack.wait_run(parent.id)
    published = wait_until(
        lambda: [event["child"] for event in stack.events(parent.id) if event["event"] == "published"], 10
    )
    (child,) = published
    assert child != parent.id
    # The child holds the queue lock now, while its parent runs: a third publish meets the child.
    (lock,) = [found for found in held_locks(tasks.app, queue_key(key)) if found.key == queue_key(key)]
    assert lock.task_id == child
    with pytest.raises(AlreadyQueued) as third:
        tasks.life_again.delay(key, 2, None)
    assert third.value.task_id == child
    stack.recorder.set(flag, 1)
    assert stack.result(parent).get() == {"id": parent.id, "n": 0}
    assert stack.result(tasks.app.AsyncResult(child)).get() == {"id": child, "n": 1}
    runs = stack.runs(key=key)
    assert [run["id"] for run in runs] == [parent.id, child]  # each once, the child after its parent
    assert not overlaps(stack.sections(key))
    wait_until(lambda: both_free(stack, key), 10, message="the key to come free")


def test_celery_dlock_stats_shows_the_publish_time_counters(env: Any) -> None:
    stack, tasks = env
    queue, key, other = held(stack), new_key("stats"), new_key("stats-replace")
    before = {task.name: counts(tasks, task) for task in (tasks.life_drop, tasks.replace)}
    kept = tasks.life_drop.apply_async((key,), queue=queue)
    assert tasks.life_drop.apply_async((key,), queue=queue) is None
    tasks.replace.apply_async((other, 1), queue=queue)
    newest = tasks.replace.apply_async((other, 2), queue=queue)
    by_task = json.loads(run_dlock(tasks.app, "stats", "--json").output)
    shown = {name: {event: by_task[name][event] - n for event, n in was.items()} for name, was in before.items()}
    assert shown == {
        tasks.life_drop.name: {"queued": 1, "duplicate": 1, "dropped": 1, "replaced": 0},
        tasks.replace.name: {"queued": 2, "duplicate": 0, "dropped": 0, "replaced": 1},
    }
    header, *rows = run_dlock(tasks.app, "stats").output.splitlines()
    assert {"QUEUED", "DUPLICATE", "DROPPED", "REPLACED"} <= set(header.split())
    assert {tasks.life_drop.name, tasks.replace.name} <= {row.split()[0] for row in rows}
    held_queue(tasks, queue)
    assert stack.result(kept).successful() and stack.result(newest).successful()
    wait_until(lambda: both_free(stack, key) and both_free(stack, other), 10)


def test_run_scope_takes_no_publish_lock(env: Any) -> None:
    stack, tasks = env
    key = new_key("run")
    queue = held(stack)
    ids = {tasks.run.apply_async((key,), queue=queue).id for _ in range(3)}
    assert len(ids) == 3
    assert not stack.lock_exists(queue_key(key))
    assert str(uuid.UUID(next(iter(ids))))
