"""The Celery side: a single-flight task that charges an account under the ledger lock.

Run a worker with ``celery -A tasks worker`` from this directory (the
environment of :mod:`ledger` set).  ``@single_flight`` takes the same
``ledger:<account>`` lock that the web endpoint takes with ``AsyncRedlock``.
"""

from __future__ import annotations

import time

import redis
from celery import Celery
from ledger import FENCED_SET, WORK_SECONDS, StaleWrite, balance_keys, env, lock_urls

from celery_dlock import current_lock, single_flight

app = Celery("fastapi_ledger", broker=env("FASTAPI_LEDGER_BROKER_URL"), backend=env("FASTAPI_LEDGER_BROKER_URL"))
app.conf.update(
    dlock_redis_url=lock_urls(),
    dlock_requeue_delay=0.02,
    dlock_requeue_max_delay=0.2,
    broker_connection_retry_on_startup=True,
)

store = redis.Redis.from_url(env("FASTAPI_LEDGER_STORE_URL"))
fenced_set = store.register_script(FENCED_SET)


@app.task(bind=True)
@single_flight(key="ledger:{account_id}", ttl=10, on_busy="wait")
def charge(self: object, account_id: int, amount: int) -> int:
    """Add ``amount`` to the account's balance under its lock; returns the new balance."""
    lock = current_lock()
    balance_key, _ = keys = balance_keys(account_id)
    balance = int(store.get(balance_key) or 0)
    time.sleep(WORK_SECONDS)
    if not fenced_set(keys=keys, args=[balance + amount, lock.token]):
        raise StaleWrite(f"token {lock.token} is older than the store's")
    return balance + amount
