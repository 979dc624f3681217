"""The Celery app that the beat and worker subprocesses of ``test_beat.py`` run.

``celery -A beat_app beat|worker`` imports this module with ``tests/beat``
and ``tests/`` on the path (:func:`support.paths.import_path`).  Everything comes from the environment:

* ``DLOCK_TEST_BROKER_URL``: broker and result backend;
* ``DLOCK_TEST_LOCK_URLS``: ``dlock_redis_url``, comma-separated for several nodes;
* ``DLOCK_TEST_RECORDER_URL``: where task bodies record their runs;
* ``DLOCK_TEST_RUN``: an id for the test run, passed to every entry's task,
  which records into ``ticks:<run>``;
* ``DLOCK_TEST_BEAT_SCHEDULE``: ``ticks`` (a 1 s interval and a
  minutely crontab), ``cron`` (two crontabs) or empty (no entries);
* ``DLOCK_TEST_KEY_PREFIX``: ``dlock_key_prefix``, so that the claims of one
  test's beats (which outlive them) are not found by the next test's;
* ``DLOCK_TEST_MAX_SKEW``: ``dlock_beat_max_skew``;
* ``DLOCK_TEST_HOLD``: the ``hold`` period of :func:`held`, in seconds;
* ``DLOCK_TEST_WRAPPED_SCHEDULER``: ``dlock_beat_scheduler``, for beats run
  with ``-S celery_dlock.beat:ClaimingScheduler``; redbeat's entries then
  live on the (first) lock node, under the key prefix.

The beat's clock (``app.now``, which Celery's schedules and
:class:`~celery_dlock.beat.MultiBeatScheduler` read) can be moved, for the
beats only, with ``DLOCK_TEST_CLOCK_OFFSET`` (seconds added) and
``DLOCK_TEST_CLOCK_SPEED`` with ``DLOCK_TEST_CLOCK_ORIGIN``: from the real
instant ``origin`` on, the clock runs ``speed`` times as fast.  That is how a
test gives two beats different clocks, or drives a crontab through many
minutes in a few seconds.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

import redis
from celery import Celery, Task
from celery.schedules import crontab
from support.apps import PerProcess, app_urls

from celery_dlock import single_flight
from celery_dlock.beat import ENTRY_HEADER, SLOT_HEADER

URLS = app_urls()
BROKER_URL = URLS.broker
LOCK_URLS = URLS.locks
RECORDER_URL = URLS.recorder
RUN = os.environ.get("DLOCK_TEST_RUN", "run")
SCHEDULE = os.environ.get("DLOCK_TEST_BEAT_SCHEDULE", "")
KEY_PREFIX = os.environ.get("DLOCK_TEST_KEY_PREFIX", "dlock:")
MAX_SKEW = os.environ.get("DLOCK_TEST_MAX_SKEW")
HOLD = float(os.environ.get("DLOCK_TEST_HOLD", "2"))
CLOCK_OFFSET = float(os.environ.get("DLOCK_TEST_CLOCK_OFFSET", "0"))
CLOCK_SPEED = float(os.environ.get("DLOCK_TEST_CLOCK_SPEED", "1"))
CLOCK_ORIGIN = float(os.environ.get("DLOCK_TEST_CLOCK_ORIGIN", "0"))

app = Celery("beat_app", broker=BROKER_URL, backend=BROKER_URL, set_as_current=True)
app.conf.update(
    dlock_redis_url=LOCK_URLS,
    dlock_key_prefix=KEY_PREFIX,
    beat_max_loop_interval=0.2,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_redirect_stdouts=False,
    result_expires=600,
)
if MAX_SKEW is not None:
    app.conf.dlock_beat_max_skew = float(MAX_SKEW)
WRAPPED = os.environ.get("DLOCK_TEST_WRAPPED_SCHEDULER")
if WRAPPED:
    app.conf.update(
        dlock_beat_scheduler=WRAPPED, redbeat_redis_url=LOCK_URLS[0], redbeat_key_prefix=f"{KEY_PREFIX}redbeat:"
    )


def clock(real: float) -> float:
    """The beat's time at the real instant ``real`` (both Unix timestamps)."""
    return CLOCK_ORIGIN + CLOCK_SPEED * (real - CLOCK_ORIGIN) + CLOCK_OFFSET


if CLOCK_OFFSET or CLOCK_SPEED != 1:

    def _moved_now() -> datetime:
        return datetime.fromtimestamp(clock(time.time()), tz=timezone.utc).astimezone(app.timezone)

    app.now = _moved_now  # type: ignore[method-assign]


def _entries(kind: str) -> dict[str, dict[str, Any]]:
    kwargs = {"run": RUN}
    if kind == "ticks":
        return {
            "every-second": {"task": "beat_app.tick", "schedule": 1.0, "kwargs": kwargs},
            "every-minute": {"task": "beat_app.tick", "schedule": crontab(), "kwargs": kwargs},
        }
    if kind == "cron":
        return {
            "cron-minute": {"task": "beat_app.tick", "schedule": crontab(), "kwargs": kwargs},
            "cron-5-minutes": {"task": "beat_app.tick", "schedule": crontab(minute="*/5"), "kwargs": kwargs},
        }
    return {}


app.conf.beat_schedule = _entries(SCHEDULE)

#: This process's client of the recorder server.
recorder = PerProcess(lambda: redis.Redis.from_url(RECORDER_URL))


def _record(task: Task, key: str) -> None:
    request = task.request
    recorder().rpush(
        key,
        json.dumps(
            {
                "entry": getattr(request, ENTRY_HEADER, None),
                "slot": getattr(request, SLOT_HEADER, None),
                "id": request.id,
                "pid": os.getpid(),
                "at": time.time(),
            }
        ),
    )


@app.task(name="beat_app.tick", bind=True, ignore_result=True)
def tick(self: Task, run: str) -> None:
    """One periodic run: record its entry and slot in ``ticks:<run>``."""
    _record(self, f"ticks:{run}")


@app.task(name="beat_app.held", bind=True)
@single_flight(key="held:{run}", hold=HOLD)
def held(self: Task, run: str) -> str:
    """A quick job that keeps its lock to the end of its ``HOLD``-second period."""
    _record(self, f"held:{run}")
    return "ran"
