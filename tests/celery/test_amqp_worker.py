"""Single-flight tasks under a real prefork worker whose broker is RabbitMQ and whose results are in Redis.

The worker runs ``tests/celery/amqp_app.py``: ``broker_url`` is the RabbitMQ
of ``DLOCK_TEST_AMQP_URL`` (``amqp://guest:guest@127.0.0.1:5672//`` by
default; CI starts it, and the tests fail, not skip, without it),
``result_backend`` is a redis-server of the test, and ``dlock_redis_url`` is
unset, so the lock address is derived from ``result_backend``.  With
``result_backend="rpc://"`` there is nothing to derive it from, and the
worker refuses to start.

RabbitMQ is shared between runs: every stack consumes a queue of its own
(``-Q``, and ``queue=`` on every send), deleted with its exchange when the
stack closes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import kombu
import pytest
from celery import Celery, states
from celery.result import AsyncResult
from support.redis_servers import RedisServer
from support.worker_stack import Stack, new_key
from support.workers import CeleryWorker
from test_handoff_worker import assert_ran_once_in_turn, flag_set_on_exit, start_holder, wait_parked

from celery_dlock import TaskSkipped
from celery_dlock.testing.process import ManagedProcess

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]

# The variables amqp_app reads (not imported: importing it reconfigures worker_app's app here).
ENV_AMQP_URL = "DLOCK_TEST_AMQP_URL"
ENV_RESULT_BACKEND = "DLOCK_TEST_RESULT_BACKEND"
ENV_LOCK_SOURCE = "DLOCK_TEST_LOCK_SOURCE"

AMQP_URL = os.environ.get(ENV_AMQP_URL, "amqp://guest:guest@127.0.0.1:5672//")


def new_queue(label: str) -> str:
    """A queue name no other run uses."""
    return f"dlock-test-{label}-{uuid.uuid4().hex[:12]}"


def delete_queues(names: list[str]) -> None:
    """Purge and delete the queues ``names`` and their exchanges (Celery names one after each queue)."""
    with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
        for name in names:
            for delete in ("queue_purge", "queue_delete", "exchange_delete"):
                with suppress(Exception), connection.channel() as channel:  # a missing one closes the channel
                    getattr(channel, delete)(name)


def reachable_rabbitmq() -> str:
    """The RabbitMQ URL, once it answers; the test fails (not skips) if it does not."""
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
            connection.connect()
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {ENV_AMQP_URL}={AMQP_URL!r} ({exc!r}); CI starts it", False)
    return AMQP_URL


@pytest.fixture(scope="module")
def rabbitmq() -> str:
    """The RabbitMQ URL, once it answers; the tests fail (not skip) if it does not."""
    return reachable_rabbitmq()


@dataclass
class AmqpStack(Stack):
    """A :class:`Stack` whose workers and client app use RabbitMQ for the broker, on a queue of their own."""

    queue: str = ""
    #: More queues the tests publish to, deleted with :attr:`queue` (see :meth:`new_queue`).
    queues: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.app.close()
        self.app = Celery("dlock-amqp-client", broker=AMQP_URL, backend=self.broker.url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        self.env = {ENV_AMQP_URL: AMQP_URL, **self.env}

    def worker(self, **options: Any) -> CeleryWorker:
        options.setdefault("app_module", "amqp_app")
        options.setdefault("queues", [self.queue])
        return super().worker(**options)

    def send(self, name: str, *args: Any, **options: Any) -> AsyncResult:
        options.setdefault("queue", self.queue)
        return super().send(name, *args, **options)

    def new_queue(self, label: str) -> str:
        """A queue no other run uses, deleted when the stack closes."""
        name = new_queue(label)
        self.queues.append(name)
        return name

    def close(self) -> None:
        try:
            super().close()
        finally:
            delete_queues([self.queue, *self.queues])


@pytest.fixture(scope="module")
def stack(rabbitmq: str) -> Iterator[AmqpStack]:
    """One prefork worker (concurrency 4) on RabbitMQ; results, recorder and locks on one redis-server."""
    server = RedisServer().start()
    made = AmqpStack(server, [server.url], queue=new_queue("amqp"))  # the locks: result_backend's server
    try:
        made.worker(concurrency=4)
        yield made
    finally:
        made.close()
        server.stop()


@contextmanager
def holding(stack: AmqpStack, policy: str, key: str) -> Iterator[AsyncResult]:
    """A run of ``aa.<policy>`` holding ``key`` for the block; it succeeds after."""
    with flag_set_on_exit(stack, f"flag:{key}") as flag:
        holder, _ = start_holder(stack, f"aa.{policy}", key, flag, queue=stack.queue)
        yield holder
    assert stack.result(holder).state == states.SUCCESS


def test_the_worker_derives_its_locks_from_the_result_backend(stack: AmqpStack) -> None:
    where = stack.result(stack.send("aa.lock_address")).result
    assert where == {"source": "result_backend", "urls": [stack.broker.url]}
    key = new_key("where")
    with holding(stack, "requeue", key):
        assert stack.lock_token(key) is not None
    assert_ran_once_in_turn(stack, key, [stack.runs(key=key)[0]["id"]])


def test_requeue(stack: AmqpStack) -> None:
    """Six calls on one key, four at a time: the busy ones go back to the queue, and each runs once."""
    key = new_key("requeue")
    sent = [stack.send("aa.requeue", key, None, n, 0.2) for n in range(6)]  # (key, flag, n, hold)
    assert [stack.result(r, timeout=30).state for r in sent] == [states.SUCCESS] * 6
    assert_ran_once_in_turn(stack, key, [r.id for r in sent])
    assert sum(run["requeues"] for run in stack.runs(key=key)) >= 1


def test_queue(stack: AmqpStack) -> None:
    """Three duplicates park in the key's queue, then each runs once, in park order."""
    key = new_key("queue")
    with holding(stack, "queue", key) as holder:
        sent = [stack.send("aa.queue", key) for _ in range(3)]
        parked = wait_parked(stack, key, 3)
    assert [stack.result(r).state for r in sent] == [states.SUCCESS] * 3
    assert sorted(parked) == sorted(r.id for r in sent)
    assert_ran_once_in_turn(stack, key, [holder.id, *parked])
    assert [run["id"] for run in stack.runs(key=key)] == [holder.id, *parked]
    assert {stack.result(r).result["routing_key"] for r in sent} == {stack.queue}


def test_skip(stack: AmqpStack) -> None:
    """The duplicate is dropped as TaskSkipped at once: one run."""
    key = new_key("skip")
    with holding(stack, "skip", key) as holder:
        assert isinstance(stack.result(stack.send("aa.skip", key)).result, TaskSkipped)
    assert_ran_once_in_turn(stack, key, [holder.id])


def test_an_rpc_result_backend_without_dlock_redis_url_refuses_to_start(stack: AmqpStack) -> None:
    """Neither the AMQP broker nor ``rpc://`` names a Redis server: the worker exits, naming the setting."""
    queue = new_queue("rpc")
    env = {ENV_AMQP_URL: AMQP_URL, ENV_RESULT_BACKEND: "rpc://", ENV_LOCK_SOURCE: "derived"}
    worker = CeleryWorker(
        broker_url=stack.broker.url,
        lock_urls=stack.lock_urls,
        recorder_url=stack.recorder_url,
        app_module="amqp_app",
        env=env,
        concurrency=1,
        queues=[queue],
    )
    try:
        ManagedProcess.start(worker)  # not WorkerProcess.start, which waits for "ready"
        code = worker.wait(timeout=30)
        log = worker.log
        assert code != 0, log
        assert "dlock_redis_url" in log, log
        assert " ready." not in log, log
    finally:
        worker.close()
        delete_queues([queue])
