# mypy: disable-error-code="untyped-decorator"
"""The Celery app that ``test_pools.py`` runs under every pool (``-P prefork|solo|threads|gevent|eventlet``).

``celery -A pools_app worker`` imports this module with ``tests/celery`` and
``tests/`` on the path; the broker, lock nodes and recorder come from the
variables of :func:`support.apps.app_environment`.  Under ``gevent`` and
``eventlet`` the worker has monkey-patched the standard library before this
module is imported, so ``time.sleep`` and the Redis sockets here are green.

A body records itself as ``worker_app``'s do, so the suite's readers apply
(:class:`support.worker_stack.Stack`): one JSON line in ``runs`` when it
starts, one ``key token enter exit`` line in the section history when it
ends (by return or by exception), and a read at entry and a write at exit
of ``counter:<key>``, which loses an update if two bodies are inside at once.
:class:`LossRecording` tasks push one JSON line to ``lost`` from their
``on_lock_lost`` hook.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery, Task
from support.apps import PerProcess, app_urls
from support.critical_sections import counted_section

from celery_dlock import DLockError, Lock, LockLost, SingleFlightTask, current_lock, single_flight
from celery_dlock.celery.headers import REQUEUES_HEADER

URLS = app_urls()

#: JSON lines, one per body start.
RUNS = "runs"
#: JSON lines, one per ``on_lock_lost`` call.
LOST = "lost"

app = Celery("pools_app", broker=URLS.broker, backend=URLS.broker, set_as_current=True)
app.conf.update(
    dlock_redis_url=URLS.locks,
    dlock_requeue_delay=0.02,
    dlock_requeue_max_delay=0.1,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
    worker_redirect_stdouts=False,
)

#: This process's client of the recorder server (green under gevent and eventlet).
recorder = PerProcess(lambda: redis.Redis.from_url(URLS.recorder))


def record_start(task: Task, key: str) -> Lock | None:
    """Push the ``runs`` line of a body that starts now; the lock it holds."""
    lock = current_lock()
    request = task.request
    line = {
        "task": task.name,
        "id": request.id,
        "key": key,
        "token": lock.token if lock is not None else 0,
        "pid": os.getpid(),
        "hostname": request.hostname,
        "requeues": int((request.headers or {}).get(REQUEUES_HEADER, 0)),
    }
    recorder().rpush(RUNS, json.dumps(line))
    return lock


@contextmanager
def section(task: Task, key: str) -> Iterator[Lock | None]:
    """Record one body run on ``key``; yields the lock it holds."""
    lock = record_start(task, key)
    with counted_section(recorder(), key, lock.token if lock is not None else 0):
        yield lock


def wait_for_flag(flag: str | None, timeout: float = 30.0) -> None:
    """Sleep (greenly, under gevent and eventlet) until the test sets the recorder key ``flag``."""
    deadline = time.monotonic() + timeout
    while flag is not None and not recorder().exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)


@app.task(name="pa.requeue_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.02, requeue_max_delay=0.1, max_requeues=1000)
def requeue_section(self: Task, key: str, hold: float = 0.03) -> int:
    with section(self, key) as lock:
        time.sleep(hold)
    return lock.token if lock is not None else 0


@app.task(name="pa.wait_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="wait", wait_timeout=20)
def wait_section(self: Task, key: str, hold: float = 0.03) -> int:
    with section(self, key) as lock:
        time.sleep(hold)
    return lock.token if lock is not None else 0


@app.task(name="pa.failing_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="requeue", requeue_delay=0.02, requeue_max_delay=0.1, max_requeues=1000)
def failing_section(self: Task, key: str) -> None:
    with section(self, key):
        time.sleep(0.01)
        raise ValueError(f"the body of {self.request.id} failed on purpose")


@app.task(name="pa.skip_section", bind=True)
@single_flight(key="{key}", ttl=30, on_busy="skip")
def skip_section(self: Task, key: str, flag: str | None = None) -> int:
    with section(self, key) as lock:
        wait_for_flag(flag)
    return lock.token if lock is not None else 0


class LossRecording(SingleFlightTask):  # type: ignore[misc]
    """A single-flight task whose ``on_lock_lost`` records each call in ``lost``."""

    def on_lock_lost(self, lock: Lock, error: DLockError) -> None:
        line = {
            "id": lock.label,
            "key": lock.key,
            "token": lock.token,
            "error": str(error),
            "type": type(error).__name__,
            "thread": threading.current_thread().name,
        }
        recorder().rpush(LOST, json.dumps(line))


def outcome(lock: Lock | None) -> dict[str, Any]:
    """What a body past its ttl saw of its lock at its end, before the release."""
    assert lock is not None
    try:
        lock.ensure_held()
    except LockLost:
        held = False
    else:
        held = True
    return {"lost": lock.lost, "ensure_held": held, "extensions": lock.extensions, "token": lock.token}


@app.task(name="pa.spin", bind=True, base=LossRecording, single_flight={"key": "{key}", "ttl": 1, "on_busy": "skip"})
def spin(self: Task, key: str, seconds: float, then_sleep: float = 0.0) -> dict[str, Any]:
    # CPU-bound and never yielding: nothing else of this process's event loop
    # (the watchdog included, under gevent and eventlet) runs until it ends.
    # With ``then_sleep`` it yields once afterwards, still inside the body.
    lock = record_start(self, key)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    seen = outcome(lock)
    if then_sleep:
        time.sleep(then_sleep)
        # ``finished`` before the release: the watchdog has recorded the loss.
        seen["loss_recorded_in_body"] = lock.finished and not lock.released
    return seen


@app.task(
    name="pa.sleep_past_ttl", bind=True, base=LossRecording, single_flight={"key": "{key}", "ttl": 1, "on_busy": "skip"}
)
def sleep_past_ttl(self: Task, key: str, seconds: float, step: float = 0.05) -> dict[str, Any]:
    # Past its ttl too, but sleeping in short steps: under gevent and
    # eventlet each sleep lets the watchdog's green thread run.
    lock = record_start(self, key)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(step)
    return outcome(lock)
