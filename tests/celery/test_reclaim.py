"""Reclaiming a dead worker's locks from Celery's own liveness (``dlock_reclaim_offline``).

Two real prefork workers on one broker, both sending heartbeats every
second: ``observer`` consumes the default queue, ``holder`` a queue of its
own, so the test decides who runs the long task.  The observer reclaims
after Celery's expiry (2 heartbeats) plus a grace of 4 s and a ping that
gets no reply.  ``DLOCK_TEST_RECLAIM_HEARTBEAT=2`` runs them with Celery's
default heartbeat interval instead, for the figure in docs/reclaim.md.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator

import pytest
from celery import Celery, states
from celery.bin.base import CLIContext
from click.testing import CliRunner
from support.worker_stack import Stack, new_key, stacks

from celery_dlock import Redlock
from celery_dlock.celery.guard import owner_prefix
from celery_dlock.ops.cli import dlock
from celery_dlock.testing.worker_process import WorkerProcess

HEARTBEAT = float(os.environ.get("DLOCK_TEST_RECLAIM_HEARTBEAT", "1.0"))
GRACE = 4.0
#: Celery's expiry (two heartbeats), the grace, a reaper tick and the ping's timeout.
RECLAIM_BOUND = 2 * HEARTBEAT + GRACE + 0.5 + 1.0


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Stack, WorkerProcess, WorkerProcess]]:
    with stacks() as make:
        stack: Stack = make(env={"DLOCK_TEST_RECLAIM_GRACE": str(GRACE)})
        observer = stack.worker(concurrency=1, heartbeat=HEARTBEAT)
        holder = stack.worker(concurrency=1, heartbeat=HEARTBEAT, queues=["held"])
        for host in (observer.hostname, holder.hostname):
            observer.wait_for_log(f"watching worker {host}", timeout=10)
        yield stack, observer, holder


def test_a_worker_paused_past_its_heartbeat_expiry_but_within_the_grace_keeps_its_lock(
    pair: tuple[Stack, WorkerProcess, WorkerProcess],
) -> None:
    stack, observer, holder = pair
    key = new_key("paused")
    result = stack.send("wa.hold", key, 6.0, queue="held")
    (run,) = stack.wait_run(result.id)

    paused_at = time.monotonic()
    holder.pause()  # SIGSTOP to the main process and the pool: no heartbeat, no renewal, no ping reply
    # Past Celery's own expiry (2 heartbeats, so Celery's state calls it
    # OFFLINE), still inside expiry plus the grace.
    time.sleep(2 * HEARTBEAT + 1.0)
    holder.resume()
    silence = time.monotonic() - paused_at

    seen = observer.wait_for_log(rf"heard {re.escape(holder.hostname or '')} again after ([\d.]+)s", timeout=10)
    assert float(seen.group(1)) > 2 * HEARTBEAT  # Celery's expiry had passed
    assert silence < 2 * HEARTBEAT + GRACE
    assert stack.lock_token(key) == run["token"]  # never released, never retaken
    stack.result(result, timeout=20)
    assert result.state == states.SUCCESS and result.result == run["token"]
    assert len(stack.runs(key=key)) == 1 and len(stack.sections(key)) == 1
    assert "reclaimed" not in observer.log and "lost mid-body" not in holder.log


def test_celery_dlock_reap_releases_only_the_locks_of_workers_that_answer_no_ping(
    pair: tuple[Stack, WorkerProcess, WorkerProcess],
) -> None:
    stack, _, _ = pair
    live_key, dead_key = new_key("live"), new_key("dead")
    live = stack.send("wa.hold", live_key, 8.0, queue="held")
    (run,) = stack.wait_run(live.id)
    # What a worker killed before any observer heard of it leaves behind.
    left = Redlock(stack.lock_urls)
    left.acquire(dead_key, 600, owner_prefix=owner_prefix("t-dead", "gone@nowhere"), label="t-dead")
    app = Celery("reap-cli", broker=stack.broker.url, set_as_current=False)
    app.conf.dlock_redis_url = stack.lock_urls

    def reap(*args: str) -> str:
        result = CliRunner().invoke(
            dlock, ["reap", "--grace", "0.5", *args], obj=CLIContext(app=app, no_color=True, workdir=None)
        )
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        return result.output

    listed = reap("--dry-run")
    assert dead_key in listed and "gone@nowhere" in listed and "t-dead" in listed
    assert live_key not in listed and "none released" in listed
    assert stack.lock_exists(dead_key)

    assert "released 1 lock(s) of 1 offline worker(s)" in reap("--yes")
    assert not stack.lock_exists(dead_key)
    assert stack.lock_token(live_key) == run["token"]  # the live worker answered: kept
    assert stack.result(live).result == run["token"]
    assert "no locks of offline workers" in reap("--yes")
    left.close()
    app.close()


def test_sigkill_of_the_whole_worker_frees_its_lock_within_a_few_heartbeats(
    pair: tuple[Stack, WorkerProcess, WorkerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, observer, holder = pair
    key = new_key("killed")
    result = stack.send("wa.hold", key, 3600.0, queue="held")
    (run,) = stack.wait_run(result.id)
    assert 25_000 < stack.lock_pttl(key) <= 30_000  # ttl=30: without reclaiming, 30 s to wait

    killed_at = time.monotonic()
    holder.kill()  # SIGKILL to the main process and the pool at once
    elapsed = stack.wait_lock_gone(key, timeout=RECLAIM_BOUND + 5, since=killed_at)

    assert elapsed <= RECLAIM_BOUND + 2.0, elapsed
    line = observer.wait_for_log(rf"reclaimed (\d+) lock\(s\) of offline worker {re.escape(holder.hostname or '')}")
    assert line.group(1) == "1"
    assert f"{key!r} (task {result.id}, token {run['token']})" in observer.log
    # The next run takes the key at once, with a higher token.
    again = stack.send("wa.hold", key, 0.1)
    assert stack.result(again).result > run["token"]
    with capsys.disabled():
        print(f"\nreclaim: SIGKILL of the whole worker to the lock free: {elapsed:.2f}s (ttl 30s)")


def test_a_worker_that_was_never_heard_from_is_never_reaped(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(env={"DLOCK_TEST_RECLAIM_GRACE": "0"})
    observer = stack.worker(concurrency=1, heartbeat=HEARTBEAT)
    silent = stack.worker(concurrency=1, queues=["held"])  # --without-heartbeat
    key = new_key("unheard")
    result = stack.send("wa.hold", key, 3.0, queue="held")
    (run,) = stack.wait_run(result.id)
    stack.result(result, timeout=20)
    assert result.result == run["token"] and len(stack.runs(key=key)) == 1
    assert f"watching worker {silent.hostname}" not in observer.log
    assert "reclaimed" not in observer.log and "pinging" not in observer.log
