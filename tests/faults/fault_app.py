# mypy: disable-error-code="untyped-decorator"
"""The Celery app that the prefork workers of ``test_fault_celery.py`` run.

``celery -A fault_app worker`` imports it with ``tests/faults`` on the path.
The broker, lock nodes and recorder come from the environment variables that
:class:`celery_workers.CeleryWorker` sets.  The one task records its body as a
critical section in the format of :mod:`fault_holder` (so
:mod:`fault_checker` judges it like any holder's), plus a ``runs`` line saying
whether it held a lock and how often it had been requeued.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery, Task
from fault_holder import RUNS, Holder, HolderSpec, record_section

from celery_dlock import current_lock, single_flight
from celery_dlock.celery.guard import REQUEUES_HEADER

BROKER_URL = os.environ.get("DLOCK_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
LOCK_URLS = [url for url in os.environ.get("DLOCK_TEST_LOCK_URLS", BROKER_URL).split(",") if url]
RECORDER_URL = os.environ.get("DLOCK_TEST_RECORDER_URL", BROKER_URL)

app = Celery("fault_app", broker=BROKER_URL, backend=BROKER_URL, set_as_current=True)
app.conf.update(
    dlock_redis_url=LOCK_URLS,
    dlock_fail_mode="closed",
    dlock_socket_timeout=0.2,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
    worker_redirect_stdouts=False,
)

_holder: tuple[int, Holder] | None = None


def holder() -> Holder:
    """This process's recorder and fenced resource."""
    global _holder
    if _holder is None or _holder[0] != os.getpid():
        spec = HolderSpec(nodes=LOCK_URLS, recorder=RECORDER_URL, holder="celery", hold=0.02, hold_jitter=0.0)
        _holder = (os.getpid(), Holder(spec))
    return _holder[1]


@app.task(name="fa.guarded", bind=True)
@single_flight(key="{key}", ttl=2, on_busy="requeue", requeue_delay=0.05, requeue_max_delay=0.3, max_requeues=100_000)
def guarded(self: Task, key: str) -> int:
    """A critical section under the lock; never runs unlocked (fail closed)."""
    lock = current_lock()
    request = self.request
    requeues = int((request.headers or {}).get(REQUEUES_HEADER, 0))
    rec = holder()
    line = {"id": request.id, "key": key, "locked": lock is not None, "token": lock.token if lock else 0,
            "requeues": requeues, "pid": os.getpid(), "t": time.monotonic_ns()}  # fmt: skip
    rec.recorder.rpush(RUNS, json.dumps(line))
    if lock is None:
        return 0
    now = time.monotonic_ns()
    record_section(rec, key, request.id, requeues, lock, now, now, release=False)
    return lock.token
