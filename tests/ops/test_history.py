"""``celery dlock history``: a real worker's lock, force-released by an operator, then lost.

The worker runs with ``dlock_history=100``.  Its run holds a key with a 2 s
lease; ``celery dlock release`` takes the lock from under it, and the
watchdog's next renewal finds it gone.  The key's history shows the grant,
the forced release with the operator's user and host, and the loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from support.cli import run_dlock
from support.worker_stack import Stack, new_key, stacks

from celery_dlock import Redlock
from celery_dlock.ops.inspect import operator
from celery_dlock.testing.polling import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def stack() -> Iterator[Stack]:
    with stacks() as make:
        yield make(env={"DLOCK_TEST_HISTORY": "100"})


@pytest.fixture
def app(stack: Stack) -> Iterator[Celery]:
    """The operator's app: the workers' lock nodes and history setting."""
    operator_app = Celery("dlock-operator", broker=stack.broker.url, set_as_current=False)
    operator_app.conf.update(dlock_redis_url=stack.lock_urls, dlock_history=100)
    yield operator_app
    operator_app.close()


def history(app: Celery, key: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(run_dlock(app, "history", key, "--json").output)
    return entries


def test_history_shows_a_forced_release_and_the_loss_it_caused(stack: Stack, app: Celery) -> None:
    worker = stack.worker(concurrency=2)
    key = new_key("history")
    held = stack.send("wa.hold_short_ttl", key, 3.0)
    stack.wait_run(held.id)
    token = str(stack.lock_token(key))

    assert f"released {key!r}: token {token}" in run_dlock(app, "release", key, "--yes").output
    entries = wait_until(
        lambda: (found := history(app, key)) and found[-1]["event"] == "lost" and found,
        10,
        message=lambda: f"the loss in {history(app, key)}\n{stack.logs()}",
    )
    granted, forced, lost = entries
    assert granted["event"] == "granted"
    assert (granted["task"], granted["task_id"], granted["token"]) == ("wa.hold_short_ttl", held.id, token)
    assert granted["worker"] == worker.hostname
    assert forced["event"] == "forced" and forced["by"] == operator() and forced["command"] == "release"
    assert (forced["task"], forced["task_id"], forced["token"]) == ("wa.hold_short_ttl", held.id, token)
    assert (lost["task_id"], lost["token"], lost["worker"]) == (held.id, token, worker.hostname)
    assert "no longer ours" in lost["reason"]
    assert granted["at"] < forced["at"] < lost["at"]

    stack.result(held)  # the body ends; its release finds the lock gone, and adds nothing
    again = stack.send("wa.hold_short_ttl", key, 0.0)
    stack.result(again)
    entries = wait_until(
        lambda: (found := history(app, key)) and found[-1]["event"] == "released" and found,
        10,
        message=lambda: f"the release in {history(app, key)}\n{stack.logs(200)}",
    )
    assert [entry["event"] for entry in entries] == ["granted", "forced", "lost", "granted", "released"]
    assert int(entries[-1]["token"]) > int(token) and float(entries[-1]["held"]) >= 0

    table = run_dlock(app, "history", key).output.splitlines()
    assert table[0].split() == ["TIME", "EVENT", "TOKEN", "TASK", "TASK", "ID", "WORKER", "HELD", "DETAIL"]
    assert table[2].split()[3:5] == ["forced", token] and table[2].endswith(f"by {operator()} (release)")
    assert "lost" in table[3] and "no longer ours" in table[3]
    assert len(run_dlock(app, "history", key, "-n", "2").output.splitlines()) == 3, "a header and two entries"


def test_purge_is_recorded_and_history_can_be_off(stack: Stack, app: Celery) -> None:
    redlock = Redlock(stack.lock_urls)
    try:
        lock = redlock.acquire("batch:1", ttl=30, label="job-1")
        run_dlock(app, "purge", "--prefix", "batch:", "--yes")
        (forced,) = history(app, "batch:1")
        assert (forced["event"], forced["command"], forced["by"]) == ("forced", "purge", operator())
        assert (forced["task_id"], forced["token"]) == ("job-1", str(lock.token))
    finally:
        redlock.close()
    assert run_dlock(app, "history", "never-locked").output == "no history for 'never-locked'\n"

    quiet = Celery("dlock-quiet", broker=stack.broker.url, set_as_current=False)
    quiet.conf.update(dlock_redis_url=stack.lock_urls)
    assert "set dlock_history" in run_dlock(quiet, "history", "batch:1", code=1).stderr
    quiet.close()
