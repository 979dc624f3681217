# mypy: disable-error-code="untyped-decorator"
"""The Celery app of the AMQP worker tests: :mod:`worker_app` on a RabbitMQ broker.

``celery -A amqp_app worker`` (see ``test_amqp_worker.py``) imports
:mod:`worker_app`, whose ``DLOCK_TEST_BROKER_URL`` is a redis-server of the
test (the recorder lives in its database 1), and changes:

* ``broker_url`` to ``DLOCK_TEST_AMQP_URL``, a RabbitMQ ``amqp://`` URL;
* ``result_backend`` to ``DLOCK_TEST_RESULT_BACKEND`` if set (``rpc://``, say),
  else the redis-server of ``DLOCK_TEST_BROKER_URL``;
* ``dlock_redis_url``: unset, so that the lock address is derived from the
  Redis ``result_backend`` (the broker is not Redis), unless
  ``DLOCK_TEST_LOCK_SOURCE`` is ``explicit``, which keeps ``worker_app``'s
  ``DLOCK_TEST_LOCK_URLS``.

It registers one task per busy policy, ``aa.<policy>``, whose body records
its run with :func:`worker_app.section`, sleeps ``hold`` seconds and holds its
key until the test sets the recorder key ``flag`` (if given), and
``aa.lock_address``, which says where the worker's locks live and which
setting said so.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final

from celery import Task
from worker_app import BROKER_URL, app, delivery, section, wait_for_flag

from celery_dlock import single_flight
from celery_dlock.celery.app_state import locks_for
from celery_dlock.celery.settings import BUSY_POLICIES, lock_address

#: The RabbitMQ broker.
ENV_AMQP_URL: Final = "DLOCK_TEST_AMQP_URL"
#: The result backend, if not the test's redis-server.
ENV_RESULT_BACKEND: Final = "DLOCK_TEST_RESULT_BACKEND"
#: ``explicit`` keeps ``dlock_redis_url``; anything else leaves it unset.
ENV_LOCK_SOURCE: Final = "DLOCK_TEST_LOCK_SOURCE"

app.conf.update(
    broker_url=os.environ[ENV_AMQP_URL],
    result_backend=os.environ.get(ENV_RESULT_BACKEND) or BROKER_URL,
)
if os.environ.get(ENV_LOCK_SOURCE) != "explicit":
    app.conf.dlock_redis_url = None


def _policy_task(policy: str) -> Task:
    @app.task(name=f"aa.{policy}", bind=True)
    @single_flight(key="{key}", ttl=30, on_busy=policy, wait_timeout=30)
    def body(self: Task, key: str, flag: str | None = None, n: int = 0, hold: float = 0.0) -> dict[str, Any]:
        with section(self, key):
            time.sleep(hold)
            wait_for_flag(flag)
        return delivery(self, n=n)

    return body


#: ``aa.requeue``, ``aa.skip``, ``aa.wait``, ``aa.raise``, ``aa.queue`` and ``aa.coalesce``.
POLICY_TASKS = {policy: _policy_task(policy) for policy in BUSY_POLICIES}


@app.task(name="aa.lock_address")
def lock_address_in_use() -> dict[str, Any]:
    """Where this worker's locks live, and the setting that said so."""
    return {"source": lock_address(app.conf).source, "urls": list(locks_for(app).settings.redis_url)}
