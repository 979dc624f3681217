"""What Flower shows of single-flight tasks, read from a real Flower's HTTP API.

One prefork worker sending task events (``-E``) runs the tasks of
:mod:`worker_app`; a real ``celery flower`` (:class:`support.flower.Flower`)
consumes those events from the same broker, and each test reads
``/api/task/info/<id>`` back, next to the result backend.  The cases are the
ones ``docs/policies.md`` describes under "What Flower shows": a requeued
task, a coalesced one, a skipped one, and the worker log line of a lock lost
mid-body.  Every wait is a bounded poll.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import states
from support.flower import Flower
from support.worker_stack import KEY_PREFIX, Stack, new_key

from celery_dlock import Redlock
from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.worker, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def watched(make_stack: Callable[..., Stack]) -> Any:
    """A stack with one worker sending task events, and a Flower watching it."""
    stack = make_stack()
    stack.worker(concurrency=2, extra_args=["-E"])
    flower = Flower(stack.broker.url).start()
    try:
        wait_consuming(flower, stack)
        yield stack, flower
    finally:
        flower.close()


def wait_consuming(flower: Flower, stack: Stack, timeout: float = 30.0) -> None:
    """Send probe tasks until Flower has one whole: from then on it sees every event.

    Flower answers HTTP before its event consumer has bound its queue, and the
    events sent before that are never delivered to it, so one probe can be
    missed for good: each probe gets a few seconds, then another is sent.
    """
    deadline = time.monotonic() + timeout
    while True:
        probe = stack.send("wa.wait_section", new_key("probe"), 0.0)
        try:
            wait_state(flower, stack, probe.id, states.SUCCESS, timeout=min(3.0, deadline - time.monotonic()))
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise


def wait_state(flower: Flower, stack: Stack, task_id: str, *wanted: str, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until Flower has ``task_id`` in one of the states ``wanted``; returns its info."""

    def seen() -> dict[str, Any] | None:
        info = flower.task(task_id)
        return info if info is not None and info["state"] in wanted else None

    return wait_until(
        seen,
        timeout,
        interval=0.05,
        message=lambda: f"{task_id} in {wanted}; Flower has {flower.task(task_id)}\n{stack.logs()}",
    )


def test_a_requeued_task_is_not_its_own_parent(watched: tuple[Stack, Flower]) -> None:
    stack, flower = watched
    key = new_key("requeue")
    holder = Redlock(stack.lock_urls).acquire(key, ttl=30)
    try:
        result = stack.send("wa.requeue_section", key, 0.0)
        wait_state(flower, stack, result.id, "REQUEUED")
    finally:
        holder.release()
    assert stack.result(result).state == states.SUCCESS

    info = wait_state(flower, stack, result.id, states.SUCCESS)
    # The copy is the same task (same id); its parent is the original's: none.
    assert info["parent_id"] is None, (info["parent_id"], info["children"])
    assert info["root_id"] == result.id
    assert info["children"] == []


@pytest.mark.parametrize(
    ("name", "final"),
    [
        # The task-coalesced event, then the task-succeeded of the stored result.
        ("wa.coalesce_section", states.SUCCESS),
        # With no result stored, the task-coalesced event alone.
        ("wa.coalesce_unstored", "COALESCED"),
    ],
)
def test_a_coalesced_task_names_the_run_that_serves_it(watched: tuple[Stack, Flower], name: str, final: str) -> None:
    stack, flower = watched
    key, flag = new_key("coalesce"), new_key("flag")
    try:
        holder = stack.send(name, key, 0, flag)
        stack.wait_run(holder.id)
        carrier = stack.send(name, key, 1, flag)
        wait_state(flower, stack, carrier.id, "PARKED")
        folded = stack.send(name, key, 2, flag)
        info = wait_state(flower, stack, folded.id, final)
    finally:
        stack.recorder.set(flag, 1)

    assert info["result"] == repr({"coalesced_into": carrier.id})
    served = wait_state(flower, stack, carrier.id, states.SUCCESS)
    assert stack.runs(task_id=carrier.id)[0]["key"] == key
    # Published from the holder's release, the carrier is not the holder's child.
    assert served["parent_id"] is None, (served["parent_id"], holder.id)
    assert wait_state(flower, stack, holder.id, states.SUCCESS)["children"] == []
    if final == states.SUCCESS:
        assert stack.result(folded).result == {"coalesced_into": carrier.id}
        assert stack.result(carrier).result["n"] == 2  # the carrier ran with the latest arguments


def test_a_skipped_task_has_the_same_state_in_flower_and_the_backend(watched: tuple[Stack, Flower]) -> None:
    stack, flower = watched
    key = new_key("skip")
    holder = Redlock(stack.lock_urls).acquire(key, ttl=30)
    try:
        result = stack.result(stack.send("wa.long_once_skip", key))
    finally:
        holder.release()

    assert result.state == states.FAILURE
    assert type(result.result).__name__ == "TaskSkipped"
    info = wait_state(flower, stack, result.id, states.FAILURE)
    assert info["exception"].startswith("TaskSkipped("), info


def test_a_lost_lock_warning_names_its_task(watched: tuple[Stack, Flower]) -> None:
    stack, _flower = watched
    (worker,) = stack.workers
    key = new_key("lost")
    result = stack.send("wa.hold_short_ttl", key, 2.0)
    stack.wait_run(result.id)
    stack.locks.delete(f"{KEY_PREFIX}lock:{key}")  # the next renewal (ttl=2) finds it gone

    line = worker.wait_for_log(rf".*lock {re.escape(repr(key))} of \S+ lost mid-body.*", timeout=10).group(0)
    assert f"] wa.hold_short_ttl[{result.id}]: lock " in line, line
    assert "???" not in line
    assert stack.result(result).state == states.SUCCESS
