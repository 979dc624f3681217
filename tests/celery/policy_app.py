# mypy: disable-error-code="untyped-decorator"
"""The Celery app of worker tests that run every busy policy: :mod:`worker_app` and a task per policy.

``sa.<policy>`` for each of ``requeue``, ``skip``, ``wait``, ``raise``,
``queue`` and ``coalesce``: the body records its run with
:func:`worker_app.section` and holds its key until the test sets the
recorder key ``flag`` (if given); and ``sa.hold``, held for a period after
each run.  Its settings are :mod:`worker_app`'s, so its locks are on
``DLOCK_TEST_LOCK_URLS`` (a Redis Cluster URL, for the Cluster tests);
:mod:`sentinel_app` puts it behind Sentinel.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from support.apps import HOLD_SECONDS
from worker_app import app, delivery, section, wait_for_flag

from celery_dlock import single_flight
from celery_dlock.celery.settings import BUSY_POLICIES

__all__ = ["HOLD_SECONDS", "POLICY_TASKS", "app", "held"]


def _policy_task(policy: str) -> Task:
    @app.task(name=f"sa.{policy}", bind=True)
    @single_flight(key="{key}", ttl=30, on_busy=policy, wait_timeout=30)
    def body(self: Task, key: str, flag: str | None = None, n: int = 0) -> dict[str, Any]:
        with section(self, key):
            wait_for_flag(flag)
        return delivery(self, n=n)

    return body


#: ``sa.requeue``, ``sa.skip``, ``sa.wait``, ``sa.raise``, ``sa.queue`` and ``sa.coalesce``.
POLICY_TASKS = {policy: _policy_task(policy) for policy in BUSY_POLICIES}


@app.task(name="sa.hold", bind=True)
@single_flight(key="{key}", hold=HOLD_SECONDS, on_busy="skip")
def held(self: Task, key: str) -> dict[str, Any]:
    """One run per ``HOLD_SECONDS`` period of ``key``: later calls in the period are skipped."""
    with section(self, key):
        pass
    return delivery(self)
