"""examples/fastapi: web requests and Celery tasks charge one account at once, and the balance is exact.

The endpoint runs in this process through httpx's ASGI transport; the task
runs in a real prefork worker; the lock nodes, broker and store are real
redis-servers.  A lost update (two holders inside at once) would leave the
balance short; a stale holder's write would be refused and fail its call.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import httpx
import pytest
from celery import Celery
from support.paths import TESTS_DIR
from support.redis_servers import RedisCluster, RedisServer

from celery_dlock.testing.worker_process import WorkerProcess

EXAMPLE = TESTS_DIR.parent / "examples" / "fastapi"
#: Imported here; ``tasks`` only in the worker: its ``@app.task`` would be shared with every later app of the suite.
MODULES = ("ledger", "app")
CHARGES = 20


@pytest.fixture
def example(
    redis_server: RedisServer, lock_server: RedisServer, redis_nodes3: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, ModuleType]]:
    """The example's modules, imported with its environment set, and a worker running its tasks."""
    env = {
        "FASTAPI_LEDGER_BROKER_URL": redis_server.url,
        "FASTAPI_LEDGER_LOCK_URLS": ",".join(redis_nodes3.urls),
        "FASTAPI_LEDGER_STORE_URL": lock_server.url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    worker = WorkerProcess("tasks", concurrency=4, env=env, pythonpath=[EXAMPLE], cwd=EXAMPLE)
    worker.start()
    try:
        yield {name: importlib.import_module(name) for name in MODULES}
    finally:
        worker.close()
        for name in MODULES:
            sys.modules.pop(name, None)


@pytest.mark.worker
@pytest.mark.multinode
def test_the_endpoint_and_the_task_update_one_ledger_under_one_lock(
    example: dict[str, ModuleType], lock_server: RedisServer
) -> None:
    api = example["app"].api
    broker = os.environ["FASTAPI_LEDGER_BROKER_URL"]
    client_app = Celery("fastapi-ledger-client", broker=broker, backend=broker, set_as_current=False)

    async def scenario() -> list[httpx.Response]:
        async with api.router.lifespan_context(api):
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
                results = [client_app.send_task("tasks.charge", args=(7, 2)) for _ in range(CHARGES)]
                responses = await asyncio.gather(
                    *(client.post("/accounts/7/charge", params={"amount": 3}) for _ in range(CHARGES))
                )
                await asyncio.to_thread(lambda: [result.get(timeout=60) for result in results])
        return list(responses)

    try:
        responses = asyncio.run(scenario())
    finally:
        client_app.close()
    assert [r.status_code for r in responses] == [200] * CHARGES
    tokens = [r.json()["token"] for r in responses]
    assert len(set(tokens)) == CHARGES
    store = lock_server.client()
    assert int(store.get("balance:7")) == CHARGES * (2 + 3), "no update was lost"
    assert int(store.get("fence:7")) >= max(tokens)
