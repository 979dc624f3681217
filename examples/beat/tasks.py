"""The beat demo's Celery app: one job, due every second, and several beats.

``beat_scheduler`` is :class:`celery_dlock.beat.MultiBeatScheduler`, so every
``celery -A tasks beat`` started with this app claims each run in Redis before
publishing it: however many beats run, each tick is published once.

The job appends one line per run to a log file: the tick (its slot, which the
scheduler puts in the ``dlock_beat_slot`` header), the time it ran and the
worker process.  It is a plain task, with no lock of its own, so the log shows
what the scheduler alone does.

Configured from environment variables, which ``run.py`` sets:

``BEAT_DEMO_BROKER_URL``  the Celery broker
``BEAT_DEMO_LOCK_URL``    ``dlock_redis_url``: where the beats' claims live
``BEAT_DEMO_LOG``         the file the job appends to
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

BROKER_URL = os.environ.get("BEAT_DEMO_BROKER_URL", "redis://127.0.0.1:6379/0")
LOCK_URL = os.environ.get("BEAT_DEMO_LOCK_URL", BROKER_URL)
LOG = os.environ.get("BEAT_DEMO_LOG", "ticks.log")

app = Celery("beat_demo", broker=BROKER_URL)
app.conf.update(
    beat_scheduler="celery_dlock.beat:MultiBeatScheduler",
    beat_schedule={
        "append-line": {"task": "demo.append_line", "schedule": 1.0},
    },
    dlock_redis_url=LOCK_URL,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="demo.append_line", bind=True)
def append_line(self: Any) -> None:
    """Append ``<tick> ran <time> worker-pid <pid>`` to the log: one line per run."""
    tick = getattr(self.request, "dlock_beat_slot", None) or "(not from beat)"
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    # One short write with O_APPEND: lines from several pool processes never mix.
    with open(LOG, "a") as log:
        log.write(f"{tick} ran {stamp} worker-pid {os.getpid()}\n")
