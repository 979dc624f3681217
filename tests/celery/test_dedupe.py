"""A completed task is not run again: ``dedupe_completed=True``, under a real redelivery.

The scenario of ``test_worker_prefork.py::test_redelivered_message_never_overlaps``:
``acks_late`` with a Redis broker whose ``visibility_timeout`` (2 s) is
shorter than the first run (6 s), so the broker delivers the running message
again, and each copy is requeued while the first run holds the key.  Without
the option the body then runs again, once per copy; with it, it runs once.
"""

from __future__ import annotations

from collections.abc import Callable

import redis
from celery import states
from support.worker_stack import Stack, new_key

from celery_dlock.testing.polling import wait_until


def test_a_redelivered_copy_of_a_task_that_succeeded_is_acked_and_not_run(
    stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory(env={"DLOCK_TEST_ACKS_LATE": "1", "DLOCK_TEST_VISIBILITY_TIMEOUT": "2"})
    stack.worker(concurrency=2)
    stack.worker(concurrency=2)
    key = new_key("dedupe")
    result = stack.send("wa.long_once_dedupe", key, 6.0)
    (run,) = stack.wait_run(result.id)
    stack.result(result, timeout=30)
    assert result.state == states.SUCCESS and result.result == run["token"]

    # Every copy the broker delivered again meets the done-marker and is acked.
    skipped = f"long_once_dedupe[{result.id}] already succeeded: acked, not run again"
    broker = redis.Redis.from_url(stack.broker.url)

    def drained() -> bool:
        logs = "".join(worker.log for worker in stack.workers)
        pending = broker.llen("celery") + broker.hlen("unacked") + broker.zcard("unacked_index")
        return skipped in logs and pending == 0

    wait_until(drained, 30, interval=0.1, message=lambda: f"every copy acked\n{stack.logs()}")
    broker.close()
    assert len(stack.runs(task_id=result.id)) == 1
    assert len(stack.sections(key)) == 1 and stack.counter(key) == 1
    assert result.result == run["token"]  # the first run's result stands
    assert not stack.lock_exists(key)
    marker = stack.locks.pttl(stack.keyspace.done(result.id))
    assert 0 < marker <= 7200 * 1000  # dlock_dedupe_ttl bounds it
