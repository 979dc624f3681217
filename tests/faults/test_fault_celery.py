"""A full outage of the lock nodes under a real prefork worker, in fail-closed mode.

The worker (``celery -A fault_app worker -P prefork``) has ``dlock_redis_url``
on three nodes; the broker is a server of its own.  Every node is killed,
tasks are sent, the nodes come back: each task is requeued while they are
down, never runs without its lock, and runs exactly once when they are back.
Nothing is lost.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from fault_harness import FAULTS_DIR, FSYNC_ALWAYS, Scenario, Timing, now_ns, soak
from fault_holder import RUNS
from support.redis_servers import RedisServer
from support.results import collect_results
from support.workers import CeleryWorker

from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.worker, pytest.mark.multinode, pytest.mark.timeout(240)]


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def runs(scenario: Scenario) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in scenario.recorder.lrange(RUNS, 0, -1)]


def test_full_outage_requeues_every_task_and_runs_it_once_the_nodes_are_back(
    scenario: Scenario, broker: RedisServer
) -> None:
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    worker = CeleryWorker(
        broker_url=broker.url, lock_urls=quorum.urls, recorder_url=scenario.recorder_url,
        concurrency=2, app_module="fault_app", app_dir=FAULTS_DIR,
    )  # fmt: skip
    client = Celery("fault-client", broker=broker.url, backend=broker.url, set_as_current=False)
    sent: list[Any] = []
    try:
        worker.start()
        # One key for every task: the recorder's counter and fenced resource are per run, not per key.
        assert client.send_task("fa.guarded", args=["ledger"]).get(timeout=30) > 0, worker.log_tail()

        down_at = quorum.outage()
        sent = [client.send_task("fa.guarded", args=["ledger"]) for _ in range(soak(6, 30))]
        ids = {result.id for result in sent}
        wait_until(
            lambda: all(f"{task_id}]: requeued in" in worker.log for task_id in ids), 30,
            message=lambda: f"every task to be requeued\n{worker.log_tail()}",
        )  # fmt: skip
        time.sleep(soak(1.5, 15.0))  # and the outage goes on a while
        assert [run for run in runs(scenario) if run["id"] in ids] == [], "a task ran while every node was down"
        assert all(not result.ready() for result in sent)

        back_at = now_ns()
        healed_at = quorum.start(0, 1, 2)
        for result in sent:
            result.get(timeout=60, propagate=False)
        assert [result.state for result in sent] == [states.SUCCESS] * len(sent), worker.log_tail()
    finally:
        worker.stop()
        sent.clear()
        collect_results()
        client.close()

    done = [run for run in runs(scenario) if run["id"] in ids]
    assert Counter(run["id"] for run in done) == Counter(ids), "every requeued task runs exactly once"
    assert all(run["locked"] and run["token"] > 0 for run in done), "no task ran unlocked"
    assert all(run["requeues"] >= 1 for run in done), "each was requeued during the outage"
    history = scenario.history(reload=True)
    assert not [e for e in history.entered if down_at <= e["enter"] < back_at]
    # The lock service is back within its bound; the tasks then wait out their
    # requeue countdowns (at most requeue_max_delay=0.3 s each).
    scenario.liveness(healed_at, Timing(ttl=2.0, retry_delay=0.3, retry_jitter=0.0))
    verdict = scenario.verdict("full outage under a prefork worker")
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
    assert verdict.unfenced_violations == 0, scenario.explain("two task bodies overlapped")
    assert verdict.token_inversions == 0, scenario.explain("a later run got a lower token")
