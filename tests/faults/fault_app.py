# mypy: disable-error-code="untyped-decorator"
"""The Celery app that the prefork workers of ``test_fault_celery.py`` run.

``celery -A fault_app worker`` imports it with ``tests/faults`` and
``tests/`` on the path.  The broker, lock nodes and recorder come from the
environment variables that :class:`support.workers.CeleryWorker` sets.  The one task records its body as a
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
from support.apps import PerProcess, app_urls

from celery_dlock import current_lock, single_flight
from celery_dlock.celery.headers import REQUEUES_HEADER

URLS = app_urls()
BROKER_URL = URLS.broker
LOCK_URLS = URLS.locks
RECORDER_URL = URLS.recorder

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

#: This process's recorder and fenced resource.
holder = PerProcess(
    lambda: Holder(HolderSpec(nodes=LOCK_URLS, recorder=RECORDER_URL, holder="celery", hold=0.02, hold_jitter=0.0))
)


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
