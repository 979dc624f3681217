"""The web side: a FastAPI endpoint that charges an account under the ledger lock, from asyncio.

Run it with ``uvicorn app:api`` from this directory (the environment of
:mod:`ledger` set).  ``POST /accounts/{account_id}/charge?amount=N`` takes
``ledger:<account>`` with :class:`celery_dlock.aio.AsyncRedlock`, the lock the
Celery task :func:`tasks.charge` takes, so the two never update one balance
at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
from fastapi import FastAPI
from ledger import FENCED_SET, LOCK_TTL, WORK_SECONDS, StaleWrite, balance_keys, env, lock_key, lock_urls

from celery_dlock.aio import AsyncRedlock


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    """One lock manager and one store client for the application's event loop."""
    api.state.redlock = AsyncRedlock(lock_urls(), retry_count=1000, retry_delay=0.02)
    api.state.store = redis.asyncio.Redis.from_url(env("FASTAPI_LEDGER_STORE_URL"))
    api.state.fenced_set = api.state.store.register_script(FENCED_SET)
    yield
    await api.state.redlock.close()
    await api.state.store.aclose()


api = FastAPI(title="ledger", lifespan=lifespan)


@api.post("/accounts/{account_id}/charge")
async def charge(account_id: int, amount: int) -> dict[str, Any]:
    """Add ``amount`` to the balance under the account's lock; the new balance and the lock's token."""
    state = api.state
    async with state.redlock.lock(lock_key(account_id), ttl=LOCK_TTL) as lock:
        balance_key, _ = keys = balance_keys(account_id)
        balance = int(await state.store.get(balance_key) or 0)
        await asyncio.sleep(WORK_SECONDS)
        lock.ensure_held()
        if not await state.fenced_set(keys=keys, args=[balance + amount, lock.token]):
            raise StaleWrite(f"token {lock.token} is older than the store's")
    return {"account": account_id, "balance": balance + amount, "token": lock.token}
