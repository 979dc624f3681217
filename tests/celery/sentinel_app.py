# mypy: disable-error-code="untyped-decorator"
"""The Celery app of the Sentinel worker tests: :mod:`worker_app` with everything behind Redis Sentinel.

``celery -A sentinel_app worker`` (see :class:`support.sentinel.SentinelStack`)
imports :mod:`worker_app`, whose broker and result backend are the
``sentinel://`` URL of ``DLOCK_TEST_BROKER_URL``, and adds what Sentinel needs:

* ``DLOCK_TEST_SENTINEL_MASTER``: the master name, as Celery's own
  ``broker_transport_options`` and ``result_backend_transport_options``
  ``master_name``;
* ``DLOCK_TEST_LOCK_SOURCE``: ``broker`` leaves ``dlock_redis_url`` unset, so
  the lock address is derived from ``broker_url`` and its ``master_name``;
  ``explicit`` sets ``dlock_redis_url`` (``DLOCK_TEST_LOCK_URLS``) and
  ``dlock_sentinel_master``.

It also registers one task per busy policy, ``sa.<policy>``, whose body
records its run with :func:`worker_app.section` and holds its key until the
test sets the recorder key ``flag`` (if given), and ``sa.lock_address``,
which says where the worker's locks live and which setting said so.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Task
from support.sentinel import ENV_LOCK_SOURCE, ENV_SENTINEL_MASTER, sentinel_conf
from worker_app import BROKER_URL, app, delivery, section, wait_for_flag

from celery_dlock import single_flight
from celery_dlock.celery.app_state import locks_for
from celery_dlock.celery.settings import BUSY_POLICIES, lock_address

MASTER_NAME = os.environ[ENV_SENTINEL_MASTER]

app.conf.update(sentinel_conf(BROKER_URL, MASTER_NAME))
if os.environ.get(ENV_LOCK_SOURCE) == "broker":
    app.conf.dlock_redis_url = None
else:
    app.conf.dlock_sentinel_master = MASTER_NAME


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


@app.task(name="sa.lock_address")
def lock_address_in_use() -> dict[str, Any]:
    """Where this worker's locks live, and the setting that said so."""
    settings = locks_for(app).settings
    return {
        "source": lock_address(app.conf).source,
        "urls": list(settings.redis_url),
        "sentinel_master": settings.sentinel_master,
    }
