"""``celery dlock metrics`` scraped while a real prefork worker runs a contended scenario.

The worker runs with ``dlock_metrics`` on; the exporter is a real ``celery
-A worker_app dlock metrics`` process; its page is parsed by
``prometheus_client``'s text parser and checked against the known counts:
one holder, three messages parked behind it, two duplicates skipped, and
one requeued until the key is free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from support.commands import DLockExporter, Samples
from support.worker_stack import Stack, new_key, stacks

from celery_dlock.testing.polling import wait_until

pytestmark = pytest.mark.timeout(90)

QUEUED = "wa.queue_section"
SKIPPED = "wa.skip_section"
REQUEUED = "wa.requeue_section"


@pytest.fixture
def stack() -> Iterator[Stack]:
    with stacks() as make:
        yield make(env={"DLOCK_TEST_METRICS": "1"})


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_until(exporter: DLockExporter, expected: dict[tuple[str, str], float]) -> Samples:
    """Scrape until every ``(metric, task)`` has its value: the workers flush their counts within a second."""

    def settled() -> Samples | None:
        samples = exporter.samples()
        return samples if all(value(samples, n, task=t) == v for (n, t), v in expected.items()) else None

    return wait_until(settled, 15, interval=0.1, message=lambda: f"{expected} in\n{exporter.text()}")


def test_the_exporter_counts_a_contended_key(stack: Stack) -> None:
    worker = stack.worker(concurrency=2)
    exporter = DLockExporter(stack).start()
    try:
        key, flag = new_key("metrics"), new_key("flag")
        holder = stack.send(QUEUED, key, 0.0, flag)
        stack.wait_run(holder.id)
        granted_by = time.time()
        parked = [stack.send(QUEUED, key, 0.0, flag) for _ in range(3)]
        skipped = [stack.send(SKIPPED, key) for _ in range(2)]
        requeued = stack.send(REQUEUED, key, 0.0)
        for result in skipped:
            stack.result(result)

        live = scrape_until(
            exporter,
            {
                ("celery_dlock_held_locks", QUEUED): 1,
                ("celery_dlock_parked_messages", QUEUED): 3,
                ("celery_dlock_parked_total", QUEUED): 3,
                ("celery_dlock_skipped_total", SKIPPED): 2,
                ("celery_dlock_acquired_total", QUEUED): 1,
            },
        )
        assert value(live, "celery_dlock_up") == 1
        assert value(live, "celery_dlock_busy_total", task=SKIPPED) == 2
        assert value(live, "celery_dlock_acquired_total", task=SKIPPED) == 0
        wait_until(
            lambda: (value(exporter.samples(), "celery_dlock_busy_total", task=REQUEUED) or 0) >= 1,
            15,
            interval=0.1,
            message="the requeued run's first attempt",
        )
        parked_by = time.time()  # every waiting run has had its first delivery

        stack.recorder.set(flag, 1)  # the holder ends; each parked message is handed on in turn
        flagged_at = time.time()
        for result in [holder, *parked, requeued]:
            stack.result(result)
        done = scrape_until(
            exporter,
            {
                ("celery_dlock_acquired_total", QUEUED): 4,
                ("celery_dlock_released_total", QUEUED): 4,
                ("celery_dlock_wait_seconds_count", QUEUED): 4,
                ("celery_dlock_hold_seconds_count", QUEUED): 4,
                ("celery_dlock_acquired_total", REQUEUED): 1,
                ("celery_dlock_wait_seconds_count", REQUEUED): 1,
            },
        )
    finally:
        exporter.close()
        worker.close()

    assert value(done, "celery_dlock_held_locks", task=QUEUED) is None, "no lock is held any more"
    assert value(done, "celery_dlock_parked_messages", task=QUEUED) is None
    assert value(done, "celery_dlock_lost_total", task=QUEUED) == 0
    # Each parked message waited from its first delivery (before parked_by:
    # it had been parked) until at least the holder's end (after flagged_at).
    waited = value(done, "celery_dlock_wait_seconds_sum", task=QUEUED)
    assert waited is not None and waited >= 3 * (flagged_at - parked_by)
    buckets = {
        labels: count
        for (name, labels), count in done.items()
        if name == "celery_dlock_wait_seconds_bucket" and dict(labels)["task"] == QUEUED
    }
    assert max(buckets.values()) == 4 and buckets[(("le", "+Inf"), ("task", QUEUED))] == 4
    # The requeued run's wait spans all its copies: from its first delivery,
    # before parked_by, to after the last parked run.
    assert (value(done, "celery_dlock_requeued_total", task=REQUEUED) or 0) >= 1
    requeued_wait = value(done, "celery_dlock_wait_seconds_sum", task=REQUEUED)
    assert requeued_wait is not None and requeued_wait >= flagged_at - parked_by
    held = value(done, "celery_dlock_hold_seconds_sum", task=QUEUED)
    assert held is not None and held >= flagged_at - granted_by, "the holder held until the flag"
    assert not [name for name, labels in done if any(k == "key" for k, _ in labels)], "no per-key labels"


def test_the_exporter_reports_redis_down(stack: Stack) -> None:
    exporter = DLockExporter(stack).start()
    try:
        lock_server = stack.lock_urls[0]
        assert value(exporter.samples(), "celery_dlock_up") == 1
        stack.locks.shutdown(nosave=True)
        samples = wait_until(lambda: (s := exporter.samples()) and value(s, "celery_dlock_up") == 0 and s, 10)
        assert {name for name, _ in samples} == {"celery_dlock_up"}, f"only up=0 while {lock_server} is down"
    finally:
        exporter.close()
