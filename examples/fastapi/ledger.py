"""What the web endpoint and the Celery task share: where things are, the lock key, the fenced write.

Both sides update one balance in a Redis "database" with a read, a pause
(a stand-in for real work, and a wide window for a race) and a write.  The
write is fenced: the store accepts it only with a fencing token above the
last one it accepted for the account, so even a holder whose lease ran out
mid-update cannot overwrite a newer holder's balance.  Sync (the task) and
async (the endpoint) holders of the key ``ledger:<account>`` get tokens from
one sequence, so one fence serves both.

``FASTAPI_LEDGER_BROKER_URL`` (the Celery broker and result backend),
``FASTAPI_LEDGER_LOCK_URLS`` (the lock nodes, comma-separated) and
``FASTAPI_LEDGER_STORE_URL`` (the balances) say where everything is.
"""

from __future__ import annotations

import os

#: Seconds between reading a balance and writing it back.
WORK_SECONDS = 0.005

#: The lease of the account lock; auto-extended while held.
LOCK_TTL = 10.0

#: Set the balance only if the token is newer than the last one accepted, and remember it.
#: KEYS: balance, last token; ARGV: new balance, token.  1 if written, 0 if refused.
FENCED_SET = """
if tonumber(ARGV[2]) <= tonumber(redis.call('GET', KEYS[2]) or '0') then
    return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def env(name: str) -> str:
    """The setting ``name``, or a clear error saying how to run the example."""
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set; see examples/fastapi/README.md")
    return value


def lock_urls() -> list[str]:
    """The lock nodes."""
    return env("FASTAPI_LEDGER_LOCK_URLS").split(",")


def lock_key(account_id: int) -> str:
    """The one lock key of an account, for the task and the endpoint alike."""
    return f"ledger:{account_id}"


def balance_keys(account_id: int) -> list[str]:
    """The store's keys of an account: its balance and the last fencing token written to it."""
    return [f"balance:{account_id}", f"fence:{account_id}"]


class StaleWrite(Exception):
    """The store refused a write fenced with an out-of-date token."""
