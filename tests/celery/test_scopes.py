"""Lock scopes from publish to finish, on real workers and a real Redis broker.

Publishes go through a copy of ``scopes_app`` built in this process, so they
take the same publish-time locks a producer would; the bodies run in a
prefork ``celery worker``.  Messages that must wait are sent to a queue no
worker consumes until the test adds a consumer for it, so every published
count is exact.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import OperationalError
from scopes_app import SHORT, build
from support.apps import AppUrls
from support.redis_servers import RedisServer
from support.worker_stack import Stack, new_key

from celery_dlock import AlreadyQueued, ConfigurationError, single_flight
from celery_dlock.celery.app_state import locks_for
from celery_dlock.celery.scopes import queue_key
from celery_dlock.ops.inspect import held_locks
from celery_dlock.testing.intervals import overlaps
from celery_dlock.testing.polling import wait_until

#: Concurrent publishes of one key.
BURST = 50


@pytest.fixture(scope="module")
def env(make_stack: Callable[..., Stack]) -> Iterator[tuple[Stack, SimpleNamespace]]:
    stack = make_stack()
    worker = stack.worker(app_module="scopes_app", concurrency=4)
    tasks = build(AppUrls(stack.broker.url, stack.lock_urls, stack.recorder_url))
    tasks.worker = worker
    yield stack, tasks
    tasks.app.close()


def held_queue(tasks: SimpleNamespace, name: str) -> None:
    """Let the worker consume ``name``, a queue it has ignored so far."""
    replies = tasks.app.control.add_consumer(name, reply=True, timeout=5, limit=1, destination=[tasks.worker.hostname])
    assert replies, "the worker did not answer add_consumer"


def burst(publish: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda _: publish(), range(BURST)))


def both_free(stack: Stack, key: str) -> bool:
    return not stack.lock_exists(key) and not stack.lock_exists(queue_key(key))


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
    queue = new_key("held")
    results = burst(lambda: task.apply_async((key, 0, flag), queue=queue))
    ids = {result.id for result in results}
    assert len(ids) == 1, ids  # one published; the 49 others got its AsyncResult
    (first,) = ids
    assert stack.lock_exists(queue_key(key))
    (queued,) = [lock for lock in held_locks(tasks.app, queue_key(key)) if lock.key == queue_key(key)]
    assert (queued.kind, queued.task_id, queued.task) == ("queue", first, task.name)
    held_queue(tasks, queue)
    stack.wait_run(first)
    wait_until(lambda: not stack.lock_exists(queue_key(key)), 10, message="the queue lock to go at start")

    second = task.apply_async((key, 1, None), queue=queue)
    if scope == "life":
        # One queued-or-running: the running copy answers for the key.
        assert second.id == first
    else:
        # "queue" lets the next one wait (and, unlocked, run); "queue+run" lets one wait.
        assert second.id != first
        more = burst(lambda: task.apply_async((key, 2, None), queue=queue))
        if scope == "queue_run":
            assert {result.id for result in more} <= {second.id}
    stack.recorder.set(flag, 1)
    assert stack.result(tasks.app.AsyncResult(first)).successful()
    if second.id != first:
        assert stack.result(second).successful()
    wait_until(lambda: both_free(stack, key), 10, message="the key to come free")
    runs = stack.runs(key=key)
    assert len(runs) == len({run["id"] for run in runs}), "nothing ran twice"
    if scope == "life":
        assert len(runs) == 1
    if scope != "queue":
        assert not overlaps(stack.sections(key))
    # The publisher's counts: one queue lock taken per message it published, a duplicate for each other.
    counted = locks_for(tasks.app).redlock.stats()[task.name]
    published = 1 if scope == "life" else 2 + (scope == "queue_run") * 0
    assert counted["duplicate"] >= BURST - 1 and counted["queued"] >= published


# -- what a duplicate publish gets ------------------------------------------------------------------


def test_on_duplicate_raise_names_the_holder_and_drop_returns_none(env: Any) -> None:
    stack, tasks = env
    queue = new_key("held")
    for raising, dropping in ((tasks.life_raise, tasks.life_drop), (tasks.queue_raise, tasks.queue_drop)):
        key = new_key("dup")
        first = raising.apply_async((key,), queue=queue)
        with pytest.raises(AlreadyQueued) as raised:
            raising.apply_async((key,), queue=queue)
        assert raised.value.task_id == first.id
        other = new_key("drop")
        kept = dropping.apply_async((other,), queue=queue)
        assert dropping.apply_async((other,), queue=queue) is None
        assert kept.id
    held_queue(tasks, queue)
    wait_until(lambda: len(stack.runs()) and not any(
        stack.lock_exists(lock.key) for lock in held_locks(tasks.app, "queued:dup-*")), 15)  # fmt: skip


def test_on_duplicate_replace_revokes_the_waiting_copy(env: Any) -> None:
    stack, tasks = env
    key, queue = new_key("replace"), new_key("held")
    first = tasks.replace.apply_async((key, 1), queue=queue)
    second = tasks.replace.apply_async((key, 2), queue=queue)
    assert second.id != first.id
    (lock,) = [found for found in held_locks(tasks.app, queue_key(key)) if found.key == queue_key(key)]
    assert lock.task_id == second.id
    held_queue(tasks, queue)
    assert stack.result(second).get()["n"] == 2
    wait_until(lambda: tasks.app.AsyncResult(first.id).state == "REVOKED", 10)
    assert [run["id"] for run in stack.runs(key=key)] == [second.id]
    wait_until(lambda: both_free(stack, key), 10)


# -- the queue lock never outlives its message -----------------------------------------------------


def test_revoked_before_start_frees_the_queue_lock(env: Any) -> None:
    stack, tasks = env
    key, queue = new_key("revoke"), new_key("held")
    result = tasks.life.apply_async((key,), queue=queue)
    tasks.app.control.revoke(result.id)
    held_queue(tasks, queue)
    since = time.monotonic()
    assert stack.wait_lock_gone(queue_key(key), 10, since) < 5
    assert stack.runs(key=key) == []
    assert tasks.life.apply_async((key,), queue=new_key("held")).id != result.id


def test_expires_bounds_the_queue_lock(env: Any) -> None:
    stack, tasks = env
    key = new_key("expires")
    started = time.monotonic()
    tasks.life.apply_async((key,), queue=new_key("held"), expires=1)
    assert 0 < stack.lock_pttl(queue_key(key)) <= 1000
    assert stack.wait_lock_gone(queue_key(key), 5, started) < 1.5


def test_a_lost_message_frees_the_key_after_countdown_plus_queue_ttl(env: Any) -> None:
    stack, tasks = env
    key = new_key("lost")
    started = time.monotonic()
    tasks.lost.apply_async((key,), queue=new_key("nowhere"), countdown=1)
    assert 2000 < stack.lock_pttl(queue_key(key)) <= (1 + SHORT) * 1000
    assert 1 + SHORT - 0.2 < stack.wait_lock_gone(queue_key(key), 10, started) < 1 + SHORT + 0.5


def test_a_publish_the_broker_refuses_frees_the_queue_lock_at_once(env: Any) -> None:
    stack, _tasks = env
    dead = RedisServer().start()
    url = dead.url
    dead.stop()
    refused = build(AppUrls(url, stack.lock_urls, stack.recorder_url))
    refused.app.conf.update(result_backend=stack.broker.url, broker_connection_timeout=0.5)  # only the broker is down
    key = new_key("refused")
    with pytest.raises(OperationalError):
        refused.life.apply_async((key,), retry=False)
    assert not stack.lock_exists(queue_key(key))
    refused.app.close()


def test_kill_9_of_the_worker_holding_a_life_lock_frees_it_within_its_ttl(env: Any) -> None:
    stack, tasks = env
    queue, key = new_key("doomed"), new_key("killed")
    doomed = stack.worker(app_module="scopes_app", concurrency=1, queues=[queue])
    result = tasks.life_short_ttl.apply_async((key, 0, new_key("never")), queue=queue)
    stack.wait_run(result.id)
    assert stack.lock_exists(key) and not stack.lock_exists(queue_key(key))
    assert tasks.life_short_ttl.apply_async((key,), queue=queue).id == result.id
    killed = time.monotonic()
    doomed.kill()
    assert stack.wait_lock_gone(key, 10, killed) < SHORT + 0.5
    again = tasks.life_short_ttl.apply_async((key,), queue=new_key("held"))
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


def test_run_scope_takes_no_publish_lock(env: Any) -> None:
    stack, tasks = env
    key = new_key("run")
    ids = {tasks.run.apply_async((key,), queue=new_key("held")).id for _ in range(3)}
    assert len(ids) == 3
    assert not stack.lock_exists(queue_key(key))
    assert str(uuid.UUID(next(iter(ids))))
