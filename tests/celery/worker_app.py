# mypy: disable-error-code="untyped-decorator"
"""The Celery app that the worker subprocesses of ``test_worker_prefork.py`` run.

``celery -A worker_app worker`` imports this module with ``tests/celery``
and ``tests/`` on the path (see :class:`support.workers.CeleryWorker`).
Everything comes from the environment:

* ``DLOCK_TEST_BROKER_URL``: broker and result backend;
* ``DLOCK_TEST_LOCK_URLS``: ``dlock_redis_url``, comma-separated for several nodes;
* ``DLOCK_TEST_RECORDER_URL``: where task bodies record what they did;
* ``DLOCK_TEST_ACKS_LATE=1``: ``task_acks_late``;
* ``DLOCK_TEST_VISIBILITY_TIMEOUT``: the Redis broker's ``visibility_timeout``
  in seconds, with unacked messages scanned for every second so that
  redelivery happens within a test.
* ``DLOCK_TEST_SWEEP_INTERVAL``: ``dlock_sweep_interval``, the seconds between
  the worker's sweeps of handoff queues whose holder died.
* ``DLOCK_TEST_METRICS=1``: ``dlock_metrics``; ``DLOCK_TEST_HISTORY``:
  ``dlock_history`` (``tests/ops/test_metrics.py``, ``test_history.py``).
* ``DLOCK_TEST_RECLAIM_GRACE``: turns ``dlock_reclaim_offline`` on, with this
  ``dlock_reclaim_grace`` in seconds.

Every task body runs inside :func:`section`, which pushes one JSON line to
the ``runs`` list when the body starts (task id, key, token, pid, node,
retries, lock-busy requeues) and one ``"key token enter_ns exit_ns"`` line to
the history of :mod:`support.critical_sections` when it ends, by return or
by exception, so that its ``read_sections`` and the interval checks apply.  It
also bumps ``counter:<key>`` with a read at entry and a write at exit: two
bodies inside at once lose an update.  A body killed with its process leaves
the start line and nothing else.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from support.apps import app_urls
from support.recording import event, recorder, section, wait_for_flag

from celery_dlock import current_lock, single_flight
from celery_dlock.celery.headers import REQUEUES_HEADER, TICKET_HEADER

URLS = app_urls()
BROKER_URL = URLS.broker
LOCK_URLS = URLS.locks
RECORDER_URL = URLS.recorder
ACKS_LATE = os.environ.get("DLOCK_TEST_ACKS_LATE") == "1"
VISIBILITY_TIMEOUT = os.environ.get("DLOCK_TEST_VISIBILITY_TIMEOUT")

#: The plugin's default key prefix; locks live at ``dlock:lock:<key>``.
KEY_PREFIX = "dlock:"

app = Celery("worker_app", broker=BROKER_URL, backend=BROKER_URL, set_as_current=True)
app.conf.update(
    dlock_redis_url=LOCK_URLS,
    # Short requeue countdowns app-wide: they also have to stay below a short
    # visibility_timeout, which the worker checks at start-up.
    dlock_requeue_delay=0.05,
    dlock_requeue_max_delay=0.5,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_acks_late=ACKS_LATE,
    result_expires=600,
    worker_redirect_stdouts=False,
)
if os.environ.get("DLOCK_TEST_METRICS") == "1":
    app.conf.dlock_metrics = True
if os.environ.get("DLOCK_TEST_HISTORY"):
    app.conf.dlock_history = int(os.environ["DLOCK_TEST_HISTORY"])
if VISIBILITY_TIMEOUT:
    app.conf.broker_transport_options = {
        "visibility_timeout": float(VISIBILITY_TIMEOUT),
        # Scan for unacked messages every second (the default is every 100 s).
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }


def lock_key_exists(key: str) -> bool:
    """Whether the lock of ``key`` exists on the first lock node."""
    client = redis.Redis.from_url(LOCK_URLS[0], socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.exists(f"{KEY_PREFIX}lock:{key}"))
    finally:
        client.close()


# -- sections with each busy policy --------------------------------------------------


@app.task(name="wa.wait_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="wait", wait_timeout=60)
def wait_section(self: Task, key: str, hold: float = 0.02) -> int:
    with section(self, key) as lock:
        time.sleep(hold)
    return lock.token if lock else 0


@app.task(name="wa.requeue_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.02, requeue_max_delay=0.2, max_requeues=1000)
def requeue_section(self: Task, key: str, hold: float = 0.02) -> int:
    with section(self, key) as lock:
        time.sleep(hold)
    return lock.token if lock else 0


@app.task(name="wa.permit_hold", bind=True)
@single_flight(key="{key}", ttl=30, limit=3, on_busy="requeue", requeue_delay=0.05, requeue_max_delay=0.2)
def permit_hold(self: Task, key: str, seconds: float = 3600.0) -> int:
    """Hold one of three permits of ``key`` for ``seconds``: three sections may overlap."""
    with section(self, key) as lock:
        time.sleep(seconds)
    return lock.token if lock else 0


@app.task(name="wa.skip_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="skip")
def skip_section(self: Task, key: str) -> int:
    with section(self, key) as lock:
        pass
    return lock.token if lock else 0


# -- bodies that last, to be killed, revoked, timed out or shut down --------------------


@app.task(name="wa.hold", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.05, requeue_max_delay=0.2, max_requeues=1000)
def hold(self: Task, key: str, seconds: float = 3600.0) -> int:
    with section(self, key) as lock:
        time.sleep(seconds)
    return lock.token if lock else 0


@app.task(name="wa.hold_short_ttl", bind=True)
@single_flight(key="{key}", ttl=2, on_busy="requeue")
def hold_short_ttl(self: Task, key: str, seconds: float = 3600.0) -> int:
    with section(self, key) as lock:
        time.sleep(seconds)
    return lock.token if lock else 0


@app.task(name="wa.slow_cleanup", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.05, requeue_max_delay=0.2, max_requeues=1000)
def slow_cleanup(self: Task, key: str, seconds: float = 3600.0, cleanup: float = 1.5) -> None:
    # A body whose own finally takes a while (flushing or rolling back partial
    # work, say); billiard runs it when SIGTERM ends the pool process.
    with section(self, key):
        try:
            time.sleep(seconds)
        finally:
            time.sleep(cleanup)


@app.task(name="wa.hard_limited", bind=True, time_limit=2)
@single_flight(key="{key}", ttl=30)
def hard_limited(self: Task, key: str, seconds: float = 60.0) -> None:
    # On a hard time limit billiard sends SIGTERM (SystemExit here), then
    # SIGKILL 0.1 s later.  This body swallows the SystemExit, so its finally
    # never runs: only the main process's hook can free the lock.
    with section(self, key):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                time.sleep(max(0.0, deadline - time.monotonic()))
            except SystemExit:
                event(self, "sigterm-ignored")


@app.task(name="wa.soft_limited", bind=True, soft_time_limit=1)
@single_flight(key="{key}", ttl=30)
def soft_limited(self: Task, key: str, seconds: float = 60.0) -> None:
    with section(self, key) as lock:
        try:
            time.sleep(seconds)
        except SoftTimeLimitExceeded:
            event(
                self, "soft-time-limit",
                held=lock is not None and not lock.lost and not lock.released,
                key_exists=lock_key_exists(key),
            )  # fmt: skip
            raise


# -- retry, Ignore, Reject ----------------------------------------------------------


@app.task(name="wa.retry_once", bind=True, max_retries=3)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.05, requeue_max_delay=0.2, max_requeues=100)
def retry_once(self: Task, key: str, countdown: float = 1.0) -> int:
    with section(self, key) as lock:
        pass
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return lock.token if lock else 0


@app.task(name="wa.requeue_counted", bind=True, max_retries=0)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.05, requeue_max_delay=0.2, max_requeues=200)
def requeue_counted(self: Task, key: str) -> dict[str, Any]:
    with section(self, key):
        pass
    return {
        "retries": self.request.retries,
        "requeues": int((self.request.headers or {}).get(REQUEUES_HEADER, 0)),
    }


@app.task(name="wa.ignore_body", bind=True)
@single_flight(key="{key}", ttl=30)
def ignore_body(self: Task, key: str) -> None:
    with section(self, key):
        raise Ignore()


@app.task(name="wa.reject_body", bind=True)
@single_flight(key="{key}", ttl=30)
def reject_body(self: Task, key: str) -> None:
    with section(self, key):
        raise Reject("rejected by the test", requeue=False)


# -- the lock service down ------------------------------------------------------------


@app.task(name="wa.fail_closed", bind=True)
@single_flight(key="{key}", ttl=30, fail_mode="closed", max_requeues=2, requeue_delay=0.05, requeue_max_delay=0.1)
def fail_closed(self: Task, key: str) -> str:
    with section(self, key):
        pass
    return "ran"


@app.task(name="wa.fail_open", bind=True)
@single_flight(key="{key}", ttl=30, fail_mode="open", max_requeues=2, requeue_delay=0.05, requeue_max_delay=0.1)
def fail_open(self: Task, key: str) -> str:
    with section(self, key):
        pass
    return "ran"


# -- redelivery: long the first time, short afterwards --------------------------------


def _first_time(task: Task) -> bool:
    return bool(recorder().set(f"ran:{task.request.id}", 1, nx=True))


@app.task(name="wa.long_once_requeue", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.1, requeue_max_delay=0.5, max_requeues=100)
def long_once_requeue(self: Task, key: str, first: float = 6.0, again: float = 0.1) -> int:
    with section(self, key) as lock:
        time.sleep(first if _first_time(self) else again)
    return lock.token if lock else 0


@app.task(name="wa.long_once_skip", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="skip")
def long_once_skip(self: Task, key: str, first: float = 6.0, again: float = 0.1) -> int:
    with section(self, key) as lock:
        time.sleep(first if _first_time(self) else again)
    return lock.token if lock else 0


@app.task(name="wa.long_once_dedupe", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.1, requeue_max_delay=0.5, dedupe_completed=True)
def long_once_dedupe(self: Task, key: str, first: float = 6.0, again: float = 0.1) -> int:
    with section(self, key) as lock:
        time.sleep(first if _first_time(self) else again)
    return lock.token if lock else 0


# -- reclaiming the locks of offline workers (test_reclaim.py) --------------------------

RECLAIM_GRACE = os.environ.get("DLOCK_TEST_RECLAIM_GRACE")
if RECLAIM_GRACE:
    app.conf.dlock_reclaim_offline = True
    app.conf.dlock_reclaim_grace = float(RECLAIM_GRACE)


# -- handoff queues: on_busy="queue" and "coalesce" (test_handoff_worker.py) -----------

SWEEP_INTERVAL = os.environ.get("DLOCK_TEST_SWEEP_INTERVAL")
if SWEEP_INTERVAL:
    app.conf.dlock_sweep_interval = float(SWEEP_INTERVAL)

#: A test header that a parked message must keep when it is handed off.
CUSTOM_HEADER = "x-dlock-test"


def delivery(task: Task, **fields: Any) -> dict[str, Any]:
    """How this copy of the message arrived: a task's return value, read by the tests."""
    request = task.request
    info = request.delivery_info or {}
    headers = request.headers or {}
    lock = current_lock()
    return {
        "id": request.id,
        "token": lock.token if lock is not None else 0,
        "ticket": headers.get(TICKET_HEADER),
        "custom": headers.get(CUSTOM_HEADER),
        "routing_key": info.get("routing_key"),
        "exchange": info.get("exchange"),
        "priority": info.get("priority"),
        "pid": os.getpid(),
        **fields,
    }


@app.task(name="wa.queue_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="queue")
def queue_section(self: Task, key: str, hold: float = 0.02, flag: str | None = None) -> dict[str, Any]:
    with section(self, key):
        wait_for_flag(flag)
        time.sleep(hold)
    return delivery(self)


@app.task(name="wa.queue_short_ttl", bind=True)
@single_flight(key="{key}", ttl=2, on_busy="queue")
def queue_short_ttl(self: Task, key: str, hold: float = 0.02, flag: str | None = None) -> dict[str, Any]:
    # Its release reserves the key for the next parked message for ttl=2 s.
    with section(self, key):
        wait_for_flag(flag)
        time.sleep(hold)
    return delivery(self)


@app.task(name="wa.coalesce_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="coalesce")
def coalesce_section(self: Task, key: str, n: int, flag: str | None = None) -> dict[str, Any]:
    with section(self, key):
        wait_for_flag(flag)
    return delivery(self, n=n)


@app.task(name="wa.coalesce_unstored", bind=True, ignore_result=True)
@single_flight(key="{key}", ttl=30, on_busy="coalesce")
def coalesce_unstored(self: Task, key: str, n: int, flag: str | None = None) -> None:
    # No result is stored: what monitors learn of a coalesce is its event alone.
    with section(self, key):
        wait_for_flag(flag)


@app.task(name="wa.queue_small", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="queue", max_queued=3)
def queue_small(self: Task, key: str, flag: str | None = None) -> dict[str, Any]:
    # A full queue falls back to a requeue (app-wide delays 0.05 to 0.5 s).
    with section(self, key):
        wait_for_flag(flag)
    return delivery(self)


@app.task(name="wa.queue_small_reject", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="queue", max_queued=3, queue_full="reject")
def queue_small_reject(self: Task, key: str, flag: str | None = None) -> dict[str, Any]:
    with section(self, key):
        wait_for_flag(flag)
    return delivery(self)
