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

It has :mod:`policy_app`'s task per busy policy, ``sa.<policy>``, and
``sa.lock_address``, which says where the worker's locks live and which
setting said so.
"""

from __future__ import annotations

import os
from typing import Any

from policy_app import POLICY_TASKS
from support.sentinel import ENV_LOCK_SOURCE, ENV_SENTINEL_MASTER, sentinel_conf
from worker_app import BROKER_URL, app

from celery_dlock.celery.app_state import locks_for
from celery_dlock.celery.settings import lock_address

__all__ = ["POLICY_TASKS", "app", "lock_address_in_use"]

MASTER_NAME = os.environ[ENV_SENTINEL_MASTER]

app.conf.update(sentinel_conf(BROKER_URL, MASTER_NAME))
if os.environ.get(ENV_LOCK_SOURCE) == "broker":
    app.conf.dlock_redis_url = None
else:
    app.conf.dlock_sentinel_master = MASTER_NAME


@app.task(name="sa.lock_address")
def lock_address_in_use() -> dict[str, Any]:
    """Where this worker's locks live, and the setting that said so."""
    settings = locks_for(app).settings
    return {
        "source": lock_address(app.conf).source,
        "urls": list(settings.redis_url),
        "sentinel_master": settings.sentinel_master,
    }
