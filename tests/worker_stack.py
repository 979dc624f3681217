"""A stack of real servers and ``celery worker`` subprocesses, shared by worker tests.

A :class:`Stack` is one redis-server for the broker, the results and the
recorder (database 1), lock nodes (a fresh redis-server unless given), and
the prefork workers (:mod:`celery_workers`) started on them, which run the
tasks of :mod:`worker_app`.  It sends tasks and reads back what their bodies
recorded, the lock hashes at ``dlock:lock:<key>`` and the task results.

The fixtures: ``make_stack`` (stacks living as long as the test module),
``stack_factory`` (stacks torn down after the test) and ``shared`` (one stack
with one worker of concurrency 4, for the module).  A test module imports the
ones it uses.
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

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from celery_workers import CeleryWorker, wait_until
from critical_sections import Section, read_sections
from redis_servers import HOST, RedisServer

__all__ = ["KEY_PREFIX", "Stack", "make_stack", "new_key", "shared", "stack_factory"]

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
        self.locks = redis.Redis.from_url(self.lock_urls[0], socket_timeout=1, socket_connect_timeout=1)

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
        return bool(self.locks.exists(f"{KEY_PREFIX}lock:{key}"))

    def lock_pttl(self, key: str) -> int:
        return int(self.locks.pttl(f"{KEY_PREFIX}lock:{key}"))

    def lock_token(self, key: str) -> int | None:
        token = self.locks.hget(f"{KEY_PREFIX}lock:{key}", "token")
        return None if token is None else int(token)

    def wait_lock_gone(self, key: str, timeout: float, since: float | None = None) -> float:
        """Wait until the lock hash of ``key`` is gone; seconds since ``since`` (or now)."""
        start = time.monotonic() if since is None else since
        wait_until(lambda: not self.lock_exists(key), timeout, interval=0.01,
                   message=lambda: f"lock {key!r} to disappear\n{self.logs()}")  # fmt: skip
        return time.monotonic() - start

    def result(self, async_result: AsyncResult, timeout: float = 20.0) -> AsyncResult:
        """Wait until ``async_result`` is ready (whatever its outcome)."""
        async_result.get(timeout=timeout, propagate=False)
        return async_result

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {w.base_name} ---\n{w.log_tail(lines)}" for w in self.workers)


@contextmanager
def _stacks() -> Iterator[Callable[..., Stack]]:
    """A factory of stacks (a fresh broker; fresh lock nodes unless given), closed on exit."""
    stacks: list[Stack] = []
    servers: list[RedisServer] = []

    def make(lock_urls: Sequence[str] | None = None, env: dict[str, str] | None = None) -> Stack:
        broker = RedisServer().start()
        servers.append(broker)
        if lock_urls is None:
            lock_server = RedisServer().start()
            servers.append(lock_server)
            lock_urls = [lock_server.url]
        stack = Stack(broker, list(lock_urls), dict(env or {}))
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.close()
        for server in servers:
            server.close()


@pytest.fixture(scope="module")
def make_stack() -> Iterator[Callable[..., Stack]]:
    """Stacks that live as long as this module's tests."""
    with _stacks() as make:
        yield make


@pytest.fixture
def stack_factory() -> Iterator[Callable[..., Stack]]:
    """Stacks torn down at the end of the test."""
    with _stacks() as make:
        yield make


@pytest.fixture(scope="module")
def shared(make_stack: Callable[..., Stack]) -> Stack:
    """One stack with one prefork worker (concurrency 4), shared by most tests."""
    stack = make_stack()
    stack.worker(concurrency=4)
    return stack
