"""Single-flight tasks under real ``celery worker -P prefork`` subprocesses.

Each test talks to real workers (:class:`support.workers.CeleryWorker`) running
the tasks of :mod:`worker_app` against real redis-server processes: one for the broker,
results and the recorder (database 1), one for the locks.  Effects are read
back from Redis: the sections the bodies recorded, the locks at
``dlock:lock:<key>``, and the task results.  Every wait is a bounded poll.

Most tests share one worker (concurrency 4) and use a key of their own; the
ones that stop, kill or reconfigure a worker start their own.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from celery import states
from celery.result import AsyncResult
from support.worker_stack import Stack, new_key

from celery_dlock import LockBusy, LockUnavailable, Redlock
from celery_dlock.testing.intervals import falling_tokens, most_at_once, overlaps
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.redis_process import HOST, free_port

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]


def assert_next_task_runs(stack: Stack, key: str, *, after_token: int, timeout: float = 15.0) -> int:
    """A following task on ``key`` runs, holding a larger token; returns the token."""
    started = time.monotonic()
    result = stack.result(stack.send("wa.wait_section", key, 0.01), timeout)
    assert result.state == states.SUCCESS, (result.state, result.result, stack.logs())
    assert result.result > after_token
    assert time.monotonic() - started < timeout
    assert not stack.lock_exists(key)
    return int(result.result)


# -- mutual exclusion ----------------------------------------------------------------------


def test_no_overlap_under_a_prefork_worker(shared: Stack) -> None:
    key = new_key("wait")
    sent = [shared.send("wa.wait_section", key, 0.02) for _ in range(20)]
    results = [shared.result(r, timeout=60) for r in sent]

    assert [r.state for r in results] == [states.SUCCESS] * 20, shared.logs()
    runs = shared.runs(key=key)
    assert Counter(run["id"] for run in runs) == Counter({r.id: 1 for r in sent})  # each ran exactly once
    assert len({run["pid"] for run in runs}) > 1  # more than one pool process took part
    sections = shared.sections(key)
    assert len(sections) == 20
    assert overlaps(sections) == []
    assert falling_tokens(sections) == []
    assert sorted(r.result for r in results) == sorted(s.token for s in sections)
    assert shared.counter(key) == 20  # no lost read-modify-write update
    assert not shared.lock_exists(key)


def test_a_limit_of_three_runs_three_at_once_and_never_more(shared: Stack) -> None:
    key = new_key("permits")
    sent = [shared.send("wa.permit_hold", key, 0.05) for _ in range(16)]
    results = [shared.result(r, timeout=60) for r in sent]

    assert [r.state for r in results] == [states.SUCCESS] * 16, shared.logs()
    assert Counter(run["id"] for run in shared.runs(key=key)) == Counter({r.id: 1 for r in sent})
    sections = shared.sections(key)
    assert len(sections) == 16
    assert 2 <= most_at_once(sections)[key] <= 3, "four pool processes, three permits"
    assert len({r.result for r in results}) == 16, "every run held a permit with its own token"
    assert Redlock(shared.lock_urls).permit_holders(key) == []


def test_kill_9_of_a_pool_process_frees_its_permit_and_no_other(shared: Stack) -> None:
    worker = shared.workers[0]
    key = new_key("permit-kill9")
    redlock = Redlock(shared.lock_urls)
    held = [shared.send("wa.permit_hold", key, 3600) for _ in range(2)]
    runs = [shared.wait_run(r.id)[0] for r in held]
    wait_until(lambda: len(redlock.permit_holders(key)) == 2, 10, message="two permits held")

    killed_at = time.monotonic()
    os.kill(runs[0]["pid"], signal.SIGKILL)
    wait_until(
        lambda: [h["label"] for h in redlock.permit_holders(key)] == [held[1].id],
        10,
        message=lambda: f"the dead run's permit freed: {redlock.permit_holders(key)}\n{shared.logs()}",
    )
    assert time.monotonic() - killed_at < 10, "the lease is 30 s: expiry cannot be what freed it"
    assert shared.result(held[0]).state == states.FAILURE
    assert shared.result(shared.send("wa.permit_hold", key, 0.01)).state == states.SUCCESS
    shared.app.control.revoke(held[1].id, terminate=True, signal="SIGTERM")
    wait_until(lambda: redlock.permit_holders(key) == [], 10, message="the last permit freed")
    wait_until(lambda: len(worker.pool_pids()) == 4, 10, message="the pool back to four processes")


def test_two_worker_processes_share_the_queue(shared: Stack) -> None:
    first = shared.workers[0]
    second = shared.worker(concurrency=4)
    try:
        key = new_key("two")
        sent = [shared.send("wa.requeue_section", key, 0.02) for _ in range(24)]
        results = [shared.result(r, timeout=60) for r in sent]
    finally:
        code = second.stop()  # the other tests expect the shared worker alone

    assert [r.state for r in results] == [states.SUCCESS] * 24, shared.logs()
    runs = shared.runs(key=key)
    assert Counter(run["id"] for run in runs) == Counter({r.id: 1 for r in sent})
    assert {run["hostname"] for run in runs} == {first.hostname, second.hostname}
    sections = shared.sections(key)
    assert len(sections) == 24
    assert overlaps(sections) == []
    assert falling_tokens(sections) == []
    assert shared.counter(key) == 24
    assert not shared.lock_exists(key)
    assert code == 0
    assert second.group_pids() == []


# -- a dead pool process: the main process frees the lock --------------------------------------


def _start_holder(stack: Stack, name: str, key: str, *args: Any) -> tuple[AsyncResult, dict[str, Any]]:
    result = stack.send(name, key, *args)
    (run,) = stack.wait_run(result.id)
    assert stack.lock_exists(key)
    assert stack.lock_token(key) == run["token"]
    return result, run


def test_kill_9_of_the_pool_process_frees_the_lock(shared: Stack) -> None:
    worker = shared.workers[0]
    key = new_key("kill9")
    result, run = _start_holder(shared, "wa.hold", key)
    assert run["pid"] in worker.pool_pids()
    assert shared.lock_pttl(key) > 20_000  # ttl=30: expiry cannot be what frees it

    killed_at = time.monotonic()
    os.kill(run["pid"], signal.SIGKILL)
    elapsed = shared.wait_lock_gone(key, timeout=10, since=killed_at)

    assert elapsed < 10
    shared.result(result)
    assert result.state == states.FAILURE
    assert type(result.result).__name__ == "WorkerLostError"
    wait_until(lambda: run["pid"] not in worker.pool_pids(), 10, message="the killed process to be reaped")
    assert len(shared.sections(key)) == 0  # the body never finished
    assert_next_task_runs(shared, key, after_token=run["token"])


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_revoke_terminate_frees_the_lock(shared: Stack, signame: str) -> None:
    worker = shared.workers[0]
    key = new_key(f"revoke-{signame}")
    result, run = _start_holder(shared, "wa.hold", key)

    revoked_at = time.monotonic()
    shared.app.control.revoke(result.id, terminate=True, signal=signame)
    elapsed = shared.wait_lock_gone(key, timeout=10, since=revoked_at)

    assert elapsed < 10
    wait_until(lambda: run["pid"] not in worker.pool_pids(), 10, message="the terminated process to exit")
    shared.result(result)
    assert result.state == states.REVOKED
    sections = shared.sections(key)
    if signame == "SIGTERM":
        # billiard turns SIGTERM into SystemExit in a pool process, so the
        # body's finally ran (and released) as well as the main process's hook.
        assert len(sections) == 1
    else:
        # Nothing ran in the killed process: the main process's hook freed it.
        assert sections == []
    assert_next_task_runs(shared, key, after_token=run["token"])


def test_revoke_sigterm_waits_for_the_body_to_finish(shared: Stack) -> None:
    worker = shared.workers[0]
    key = new_key("revoke-cleanup")
    result, _run = _start_holder(shared, "wa.slow_cleanup", key)  # its finally sleeps 1.5 s

    shared.app.control.revoke(result.id, terminate=True, signal="SIGTERM")
    worker.wait_for_log(rf"Terminating {result.id}")
    following = shared.result(shared.send("wa.wait_section", key, 0.01), timeout=15)
    wait_until(lambda: len(shared.sections(key)) == 2, 10, message="both sections to end")

    assert following.state == states.SUCCESS
    assert overlaps(shared.sections(key)) == []


def test_hard_time_limit_frees_the_lock(shared: Stack) -> None:
    worker = shared.workers[0]
    key = new_key("hard")
    result, run = _start_holder(shared, "wa.hard_limited", key)  # time_limit=2; ignores SIGTERM
    started = time.monotonic()

    elapsed = shared.wait_lock_gone(key, timeout=10, since=started)

    assert 1.0 < elapsed < 10  # at the time limit, far inside ttl=30
    shared.result(result)
    assert result.state == states.FAILURE
    assert type(result.result).__name__ == "TimeLimitExceeded"
    wait_until(lambda: run["pid"] not in worker.pool_pids(), 10, message="the timed-out process to be replaced")
    # billiard's SIGTERM reached the body, which ignored it; the SIGKILL that
    # followed meant the body's finally never ran: the main process freed it.
    # (The event may be missing if the SIGKILL came before it was written.)
    assert [e["event"] for e in shared.events(result.id)] in ([], ["sigterm-ignored"])
    assert shared.sections(key) == []
    assert_next_task_runs(shared, key, after_token=run["token"])


def test_soft_time_limit_releases_in_the_body(shared: Stack) -> None:
    worker = shared.workers[0]
    key = new_key("soft")
    result, run = _start_holder(shared, "wa.soft_limited", key)  # soft_time_limit=1, sleeps 60

    elapsed = shared.wait_lock_gone(key, timeout=10)

    assert elapsed < 10
    shared.result(result)
    assert result.state == states.FAILURE
    assert type(result.result).__name__ == "SoftTimeLimitExceeded"
    # The body saw the exception while it still held the lock; its finally released it.
    (event,) = shared.events(result.id)
    assert event["event"] == "soft-time-limit"
    assert event["held"] is True and event["key_exists"] is True
    assert len(shared.sections(key)) == 1
    assert run["pid"] in worker.pool_pids()  # nobody killed the process
    assert_next_task_runs(shared, key, after_token=run["token"])


# -- retry, requeue, Ignore, Reject -----------------------------------------------------------


def test_retry_releases_the_lock_between_attempts(shared: Stack) -> None:
    key = new_key("retry")
    result = shared.send("wa.retry_once", key, 1.5)
    (first,) = shared.wait_run(result.id)
    assert first["retries"] == 0

    # Between the attempts anyone may take the lock: this process does.
    outsider = Redlock(shared.lock_urls)

    def take() -> int | None:
        try:
            with outsider.acquire(key, ttl=5, blocking=False) as lock:
                return int(lock.token)
        except LockBusy:
            return None

    ours = wait_until(take, 10, message="the lock to be free between the attempts")
    assert len(shared.runs(task_id=result.id)) == 1  # the retry has not started yet

    shared.result(result)
    assert result.state == states.SUCCESS, (result.result, shared.logs())
    first_run, second_run = shared.runs(task_id=result.id)
    assert (first_run["retries"], second_run["retries"]) == (0, 1)
    assert first_run["token"] < ours < second_run["token"] == result.result
    assert overlaps(shared.sections(key)) == []
    assert not shared.lock_exists(key)


def test_requeues_do_not_consume_max_retries(shared: Stack) -> None:
    worker = shared.workers[0]
    key = new_key("requeue")
    outsider = Redlock(shared.lock_urls)
    lock = outsider.acquire(key, ttl=30, blocking=False)
    try:
        result = shared.send("wa.requeue_counted", key)  # max_retries=0
        worker.wait_for_log(rf"{result.id}\]: requeued in [0-9.]+s \(3/200\)", timeout=20)
        assert shared.runs(task_id=result.id) == []
    finally:
        lock.release()

    shared.result(result)
    assert result.state == states.SUCCESS, (result.result, shared.logs())
    assert result.result["retries"] == 0
    assert result.result["requeues"] >= 3
    (run,) = shared.runs(task_id=result.id)
    assert run["retries"] == 0 and run["requeues"] == result.result["requeues"]
    assert run["token"] > lock.token


@pytest.mark.parametrize("name", ["wa.ignore_body", "wa.reject_body"])
def test_ignore_and_reject_release_the_lock(shared: Stack, name: str) -> None:
    key = new_key(name.split(".")[1])
    result = shared.send(name, key)
    (run,) = shared.wait_run(result.id)

    shared.wait_lock_gone(key, timeout=5)
    assert_next_task_runs(shared, key, after_token=run["token"], timeout=10)
    assert len(shared.sections(key)) == 2
    assert overlaps(shared.sections(key)) == []
    if name == "wa.reject_body":
        assert result.state == states.FAILURE  # Reject(requeue=False) is recorded as a failure
    else:
        assert result.state == states.PENDING  # Ignore stores nothing


# -- the whole worker stops or dies -------------------------------------------------------------


def test_warm_shutdown_lets_the_task_finish_and_release(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory()
    worker = stack.worker(concurrency=2)
    key = new_key("warm")
    result, run = _start_holder(stack, "wa.hold", key, 2.0)

    code = worker.stop(timeout=30)

    assert code == 0, worker.log_tail()
    assert worker.group_pids() == []
    (section,) = stack.sections(key)  # the body ran to its end
    assert section.token == run["token"]
    assert section.exit - section.enter >= 2.0e9
    assert AsyncResult(result.id, app=stack.app).state == states.SUCCESS
    assert not stack.lock_exists(key)


def test_sigkill_of_the_whole_worker_lets_the_lock_expire(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory()
    worker = stack.worker(concurrency=2)
    key = new_key("sigkill")
    _start_holder(stack, "wa.hold_short_ttl", key)  # ttl=2

    # The watchdog keeps a 2 s lease alive well past 2 s while the body runs.
    held_since = time.monotonic()
    while time.monotonic() - held_since < 3.0:
        assert stack.lock_exists(key), stack.logs()
        time.sleep(0.05)

    assert 0 < stack.lock_pttl(key) <= 2000
    killed_at = time.monotonic()
    worker.kill()  # SIGKILL to the main process and the pool at once
    assert worker.group_pids() == []
    elapsed = stack.wait_lock_gone(key, timeout=6, since=killed_at)

    assert elapsed <= 2.0 + 2.0
    assert stack.lock_token(key) is None
    assert stack.sections(key) == []


# -- redelivery: visibility_timeout shorter than the body ---------------------------------------


def test_redelivered_message_never_overlaps(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(env={"DLOCK_TEST_ACKS_LATE": "1", "DLOCK_TEST_VISIBILITY_TIMEOUT": "2"})
    stack.worker(concurrency=2)
    stack.worker(concurrency=2)
    requeue_key, skip_key = new_key("redeliver-requeue"), new_key("redeliver-skip")
    # Each body lasts 6 s the first time it runs for a task id, 0.1 s after that.
    requeued = stack.send("wa.long_once_requeue", requeue_key, 6.0)
    skipped = stack.send("wa.long_once_skip", skip_key, 6.0)

    # Poll until both are done, watching the skip task's result meanwhile.
    skip_states: list[str] = []

    def done() -> bool:
        state = AsyncResult(skipped.id, app=stack.app).state
        if not skip_states or skip_states[-1] != state:
            skip_states.append(state)
        requeue_runs = len(stack.runs(task_id=requeued.id))
        skip_runs = len(stack.runs(task_id=skipped.id))
        return (
            len(stack.sections(requeue_key)) == requeue_runs >= 2
            and len(stack.sections(skip_key)) == skip_runs >= 2
            and state == states.SUCCESS
            and requeued.state == states.SUCCESS
        )

    wait_until(done, 30, message=lambda: f"both tasks to finish; skip states {skip_states}\n{stack.logs()}")

    # The redelivered copy of a running task waits its turn, whatever the
    # policy: it was requeued until the first run ended, then ran the body
    # again (same task id), after the first.  At least once, never alongside.
    # (A requeued copy may itself be redelivered on a slow machine: then the
    # body runs a third time, still never alongside another run.)
    for task, key in ((requeued, requeue_key), (skipped, skip_key)):
        first, *later = runs = stack.runs(task_id=task.id)
        sections = stack.sections(key)
        assert overlaps(sections) == []
        assert falling_tokens(sections) == []
        assert first["requeues"] == 0 and all(run["requeues"] > 0 for run in later)
        assert [run["token"] for run in runs] == sorted(s.token for s in sections)
        assert stack.counter(key) == len(runs)
        assert not stack.lock_exists(key)
    # on_busy="skip" never skipped a copy of itself, so its result never read FAILURE.
    assert states.FAILURE not in skip_states
    assert not any(f"{skipped.id}]: skipped:" in w.log for w in stack.workers), stack.logs()
    print(
        f"\nredelivery: runs per task {len(stack.runs(task_id=requeued.id))}, {len(stack.runs(task_id=skipped.id))}; "
        f"skip policy result states in order: {skip_states}"
    )


def test_a_second_copy_of_a_running_task_is_requeued_not_skipped(shared: Stack) -> None:
    """Skipping a copy of the running task would overwrite its result, or lose a requeued task."""
    worker = shared.workers[0]
    key = new_key("dup-skip")
    task_id = str(uuid.uuid4())
    shared.send("wa.long_once_skip", key, 2.0, task_id=task_id)
    shared.wait_run(task_id)
    # A second message with the same id is what a broker redelivery is.
    shared.send("wa.long_once_skip", key, 2.0, task_id=task_id)
    worker.wait_for_log(rf"long_once_skip\[{task_id}\]: requeued in")
    assert AsyncResult(task_id, app=shared.app).state != states.FAILURE
    wait_until(lambda: len(shared.sections(key)) == 2, 20, message="both copies to run, one after the other")
    assert overlaps(shared.sections(key)) == []
    assert "skipped" not in worker.log.split(task_id, 1)[1]


# -- the lock service is down ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_locks(make_stack: Callable[..., Stack]) -> Stack:
    """A stack whose dlock_redis_url is a port nobody listens on."""
    stack = make_stack(lock_urls=[f"redis://{HOST}:{free_port()}/0"])
    stack.worker(concurrency=2)
    return stack


def test_fail_closed_never_runs_the_body(dead_locks: Stack) -> None:
    key = new_key("closed")
    result = dead_locks.result(dead_locks.send("wa.fail_closed", key), timeout=30)

    assert result.state == states.FAILURE
    assert isinstance(result.result, LockUnavailable), result.result
    assert dead_locks.runs(key=key) == []
    assert dead_locks.counter(key) == 0
    # Requeued max_requeues=2 times, then given up.
    assert f"{result.id}]: requeued in" in dead_locks.workers[0].log
    assert "max_requeues=2" in str(result.result)


def test_fail_open_runs_the_body_once_unlocked(dead_locks: Stack) -> None:
    key = new_key("open")
    result = dead_locks.result(dead_locks.send("wa.fail_open", key), timeout=30)

    assert result.state == states.SUCCESS, result.result
    assert result.result == "ran"
    (run,) = dead_locks.runs(key=key)
    assert run["locked"] is False and run["token"] == 0
    assert dead_locks.counter(key) == 1
