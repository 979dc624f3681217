"""The ledger demo's Celery app: two ways to add to an account balance.

Both tasks do the same read-modify-write on a balance kept in Redis: read it,
pause a few milliseconds (a stand-in for real work, and a wider window for the
race), then write ``balance + amount`` back.

* :func:`charge_unlocked` is a plain task.  Run concurrently, two charges can
  read the same balance and the second write undoes the first: updates are
  lost.
* :func:`charge` is single-flight per account (``@single_flight`` with the key
  ``ledger:{account_id}``): one charge per account runs at a time, the others
  are requeued until the lock is free.  Its write is also *fenced*: the store
  accepts it only if the lock's fencing token is higher than the last token
  it accepted for the account, so a holder whose lock expired mid-body (a long
  GC pause, a stalled VM) cannot overwrite a newer holder's balance.

Everything is configured from environment variables, which ``run.py`` sets
before starting the worker and before importing this module itself:

``LEDGER_BROKER_URL``      the Celery broker
``LEDGER_RESULT_BACKEND``  the Celery result backend
``LEDGER_LOCK_URL``        ``dlock_redis_url``: where the locks live
``LEDGER_STORE_URL``       the "database" holding balances and counters
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, signals

from celery_dlock import current_lock, single_flight

#: How long a charge pauses between reading and writing the balance.
WORK_SECONDS = 0.005


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set; run the demo with `python examples/ledger/run.py`, "
            "which starts its own redis-server and sets it"
        )
    return value


app = Celery("ledger", broker=_env("LEDGER_BROKER_URL"), backend=_env("LEDGER_RESULT_BACKEND"))
app.conf.update(
    dlock_redis_url=_env("LEDGER_LOCK_URL"),
    # A busy account is retried quickly: the first requeue waits 25-50 ms,
    # doubling (jittered) up to half a second.
    dlock_requeue_delay=0.05,
    dlock_requeue_max_delay=0.5,
    # Results are read once by run.py; keep them around long enough for that.
    result_expires=600,
    broker_connection_retry_on_startup=True,
)


class StaleWrite(Exception):
    """The store refused a write fenced with an out-of-date token."""


# -- the balance store ----------------------------------------------------------

_store: redis.Redis | None = None


def store() -> redis.Redis:
    """The client of the balance store (redis-py reconnects after a fork)."""
    global _store
    if _store is None:
        _store = redis.Redis.from_url(_env("LEDGER_STORE_URL"), decode_responses=True)
    return _store


def balance_key(kind: str, account_id: str) -> str:
    return f"ledger:{kind}:{account_id}:balance"


def fence_key(account_id: str) -> str:
    return f"ledger:locked:{account_id}:last_token"


def stat_key(kind: str, name: str) -> str:
    return f"ledger:{kind}:stats:{name}"


# Accept the write only if the token is newer than the last one accepted for
# this account, and remember it: all in one atomic step inside Redis.
#   KEYS[1] balance   KEYS[2] last accepted token
#   ARGV[1] new balance   ARGV[2] fencing token
# Returns 1 if written, 0 if refused.
_FENCED_SET = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = tonumber(ARGV[2])
if token <= last then
    return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


_fenced_set_script: Any = None


def fenced_set(account_id: str, balance: int, token: int) -> None:
    """Write the locked balance of ``account_id`` if ``token`` is the newest seen."""
    global _fenced_set_script
    if _fenced_set_script is None:
        _fenced_set_script = store().register_script(_FENCED_SET)  # EVALSHA, loaded on first use
    written = _fenced_set_script(keys=[balance_key("locked", account_id), fence_key(account_id)], args=[balance, token])
    if not written:
        raise StaleWrite(f"write to account {account_id!r} with fencing token {token} refused")


# -- the tasks ---------------------------------------------------------------------


@app.task(name="ledger.charge_unlocked")
def charge_unlocked(account_id: str, amount: int) -> int:
    """Add ``amount`` to the balance with no lock: concurrent charges lose updates."""
    db = store()
    db.incr(stat_key("unlocked", "runs"))
    key = balance_key("unlocked", account_id)
    balance = int(db.get(key) or 0)
    time.sleep(WORK_SECONDS)
    balance += amount
    db.set(key, balance)
    return balance


@app.task(name="ledger.charge", bind=True)
@single_flight(key="ledger:{account_id}", ttl=30, on_busy="requeue")
def charge(self: Any, account_id: str, amount: int) -> int:
    """Add ``amount`` to the balance holding the account's lock, with a fenced write."""
    # Only a run holding the lock gets here: a busy account was requeued by
    # the plugin before this body started.
    lock = current_lock()
    assert lock is not None
    db = store()
    db.incr(stat_key("locked", "runs"))
    # How many times this message was requeued before it got the lock.
    db.incrby(stat_key("locked", "requeues_seen"), int((self.request.headers or {}).get("dlock_requeues", 0)))
    key = balance_key("locked", account_id)
    balance = int(db.get(key) or 0)
    time.sleep(WORK_SECONDS)
    balance += amount
    fenced_set(account_id, balance, lock.token)
    return balance


# Every delivery of a message counts as an attempt, including the ones the
# plugin requeues before the body runs (task_prerun fires before the lock is
# taken).  attempts - final outcomes = requeues, independent of the header.
@signals.task_prerun.connect
def _count_attempt(task: Any = None, **_: Any) -> None:
    kind = {charge.name: "locked", charge_unlocked.name: "unlocked"}.get(getattr(task, "name", None))
    if kind is not None:
        store().incr(stat_key(kind, "attempts"))
