"""What the bodies of the test apps' tasks record, for the tests to read back.

:func:`section` pushes one JSON line to :data:`RUNS` when a body starts (task
id, key, token, pid, node, retries, lock-busy requeues) and one
``"key token enter_ns exit_ns"`` line to the history of
:mod:`support.critical_sections` when it ends, by return or by exception,
and bumps ``counter:<key>`` with a read at entry and a write at exit, so two
bodies inside at once lose an update.  :func:`event` records something that
happened inside a body, and :func:`wait_for_flag` holds a body until the test
sets a key.  The recorder is the server at ``DLOCK_TEST_RECORDER_URL``
(:func:`support.apps.app_urls`), one client per pool process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Task

from celery_dlock import Lock, current_lock
from celery_dlock.celery.headers import REQUEUES_HEADER

from .apps import PerProcess, app_urls
from .critical_sections import counted_section

__all__ = ["EVENTS", "RUNS", "event", "recorder", "section", "wait_for_flag"]

#: JSON lines, one per body start.
RUNS = "runs"
#: JSON lines for what happened inside a body (a soft time limit, say).
EVENTS = "events"

#: This process's client of the recorder server.
recorder = PerProcess(lambda: redis.Redis.from_url(app_urls().recorder))


@contextmanager
def section(task: Task, key: str) -> Iterator[Lock | None]:
    """Record one body run on ``key``; yields the lock it holds (``None`` unlocked)."""
    lock = current_lock()
    token = lock.token if lock is not None else 0
    request = task.request
    rec = recorder()
    rec.rpush(
        RUNS,
        json.dumps(
            {
                "task": task.name,
                "id": request.id,
                "key": key,
                "token": token,
                "locked": lock is not None,
                "pid": os.getpid(),
                "hostname": request.hostname,
                "retries": request.retries,
                "requeues": int((request.headers or {}).get(REQUEUES_HEADER, 0)),
                "redelivered": bool((request.delivery_info or {}).get("redelivered")),
            }
        ),
    )
    with counted_section(rec, key, token):
        yield lock


def event(task: Task, kind: str, **fields: Any) -> None:
    """Record something that happened inside a body."""
    recorder().rpush(EVENTS, json.dumps({"event": kind, "id": task.request.id, "pid": os.getpid(), **fields}))


def wait_for_flag(flag: str | None, timeout: float = 60.0) -> None:
    """Block until the test sets the recorder key ``flag`` (at most ``timeout`` seconds)."""
    if flag is None:
        return
    deadline = time.monotonic() + timeout
    while not recorder().exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
