"""A stack of real servers and ``celery worker`` subprocesses, for the worker tests.

A :class:`Stack` is one redis-server for the broker, the results and the
recorder (database 1), lock nodes (a fresh redis-server unless given), and
the prefork workers (:class:`~support.workers.CeleryWorker`) started on them,
which run the tasks of ``tests/celery/worker_app.py``.  It sends tasks and
reads back what their bodies recorded, the locks at
``dlock:lock:<key>`` and the task results.  :func:`stacks` makes them and
closes them; the fixtures of ``tests/celery/conftest.py`` are built on it.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult
from redis.cluster import RedisCluster

from celery_dlock.lock.cluster import is_cluster_url
from celery_dlock.lock.keyspace import Keyspace
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.process import log_tails
from celery_dlock.testing.redis_process import HOST

from .critical_sections import Section, read_sections
from .redis_servers import RedisServer
from .results import collect_results
from .stored import stored_token
from .workers import CeleryWorker

__all__ = ["KEY_PREFIX", "Stack", "new_key", "stacks"]

KEY_PREFIX = "dlock:"


def new_key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


@dataclass
class Stack:
    """A broker (with results and the recorder) and lock nodes, and the workers on them."""

    broker: RedisServer
    lock_urls: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workers: list[CeleryWorker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Celery("dlock-test-client", broker=self.broker.url, backend=self.broker.url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        self.recorder = redis.Redis.from_url(self.recorder_url)
        self.locks = lock_client(self.lock_urls[0])

    @property
    def keyspace(self) -> Keyspace:
        """The names of the lock keys, laid out for a Cluster if the first lock node is one."""
        return Keyspace(KEY_PREFIX, clustered=is_cluster_url(self.lock_urls[0]))

    @property
    def recorder_url(self) -> str:
        return f"redis://{HOST}:{self.broker.port}/1"

    def worker(self, **options: Any) -> CeleryWorker:
        """Start a worker on this stack; it is stopped when the stack closes."""
        options.setdefault("env", self.env)
        worker = CeleryWorker(
            broker_url=self.broker.url, lock_urls=self.lock_urls, recorder_url=self.recorder_url, **options
        )
        self.workers.append(worker)
        return worker.start()

    def close(self) -> None:
        for worker in self.workers:  # warm shutdowns in parallel
            worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.close()
        self.app.close()
        self.recorder.close()
        self.locks.close()

    # -- sending and reading back ---------------------------------------------------

    def send(self, name: str, *args: Any, **options: Any) -> AsyncResult:
        return self.app.send_task(name, args=args, **options)

    def runs(self, *, key: str | None = None, task_id: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(raw) for raw in self.recorder.lrange("runs", 0, -1)]
        return [
            run for run in found
            if (key is None or run["key"] == key) and (task_id is None or run["id"] == task_id)
        ]  # fmt: skip

    def events(self, task_id: str) -> list[dict[str, Any]]:
        found = [json.loads(raw) for raw in self.recorder.lrange("events", 0, -1)]
        return [event for event in found if event["id"] == task_id]

    def sections(self, key: str) -> list[Section]:
        return [section for section in read_sections(self.recorder) if section.key == key]

    def counter(self, key: str) -> int:
        return int(self.recorder.get(f"counter:{key}") or 0)

    def wait_run(self, task_id: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until the body of ``task_id`` has started ``count`` times."""
        return wait_until(
            lambda: runs if len(runs := self.runs(task_id=task_id)) >= count else None,
            timeout,
            message=lambda: f"{count} run(s) of {task_id}; have {self.runs(task_id=task_id)}\n{self.logs()}",
        )

    def lock_exists(self, key: str) -> bool:
        return bool(self.locks.exists(self.keyspace.lock(key)))

    def lock_pttl(self, key: str) -> int:
        return int(self.locks.pttl(self.keyspace.lock(key)))

    def lock_token(self, key: str) -> int | None:
        return stored_token(self.locks, self.keyspace.lock(key))

    def wait_lock_gone(self, key: str, timeout: float, since: float | None = None) -> float:
        """Wait until the lock of ``key`` is gone; seconds since ``since`` (or now)."""
        start = time.monotonic() if since is None else since
        wait_until(lambda: not self.lock_exists(key), timeout, interval=0.01,
                   message=lambda: f"lock {key!r} to disappear\n{self.logs()}")  # fmt: skip
        return time.monotonic() - start

    def result(self, async_result: AsyncResult, timeout: float = 20.0) -> AsyncResult:
        """Wait until ``async_result`` is ready (whatever its outcome)."""
        async_result.get(timeout=timeout, propagate=False)
        return async_result

    def logs(self, lines: int = 30) -> str:
        return log_tails(self.workers, lines)


def lock_client(url: str) -> Any:
    """A redis-py client of the lock node at ``url``: for a Redis Cluster, one that follows its slots."""
    if is_cluster_url(url):
        return RedisCluster.from_url(url.replace("+cluster", "", 1), socket_timeout=1, socket_connect_timeout=1)
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


@contextmanager
def stacks() -> Iterator[Callable[..., Stack]]:
    """A factory of stacks (a fresh broker; fresh lock nodes unless given), closed on exit."""
    made: list[Stack] = []
    servers: list[RedisServer] = []

    def make(
        lock_urls: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        kind: type[Stack] = Stack,
        **fields: Any,
    ) -> Stack:
        """A stack of ``kind`` (a :class:`Stack` subclass takes its own ``fields``)."""
        broker = RedisServer().start()
        servers.append(broker)
        if lock_urls is None:
            lock_server = RedisServer().start()
            servers.append(lock_server)
            lock_urls = [lock_server.url]
        stack = kind(broker, list(lock_urls), dict(env or {}), **fields)
        made.append(stack)
        return stack

    try:
        yield make
    finally:
        collect_results()
        for stack in made:
            stack.close()
        for server in servers:
            server.stop()
