"""The Celery 5.7 floor (``setup.cfg``), proved on whichever Celery is installed.

Before 5.7, ``AsyncResult.get()`` on a result the caller has already received
still waits one drain interval (a second) for another message before it looks
at the result (``Drainer.drain_events_until`` in
``celery/backends/asynchronous.py``: ``while 1: wait; if p.ready: break``
through 5.6.3, ``while not p.ready:`` from 5.7.0).  Results of requeued runs
come back out of order, so most of them are received early and each ``get()``
then pays that second.

The wait is counted, not timed: the caller's real Redis result consumer has
its ``drain_events`` wrapped with a counter, against a real in-process worker
and a real redis-server.  The default suite runs this on the newest Celery,
where a received result drains nothing; ``.ci/run`` also runs it in a venv
pinned to Celery 5.6.3 (``.ci/floor.txt``), where the same test expects the
wait, and the package's refusal to load, so that the floor stays needed and
stated.  The expectation is chosen by the installed version, so neither side
is ever skipped.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import celery
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from support.redis_servers import RedisServer
from support.results import collect_results

from celery_dlock.testing.polling import wait_until

FIXED_IN = (5, 7)
INSTALLED = tuple(int(part) for part in celery.__version__.split(".")[:2])
HAS_FIX = INSTALLED >= FIXED_IN
SIDE = f"celery-{celery.__version__}-{'fixed' if HAS_FIX else 'waits'}"


@contextmanager
def counting_drains(app: Celery, calls: list[float]) -> Iterator[list[float]]:
    """Count the caller's result consumer's ``drain_events`` calls: one entry in ``calls`` (its timeout) each."""
    consumer = app.backend.result_consumer
    drain: Callable[..., Any] = consumer.drain_events

    def counted(timeout: float | None = None) -> Any:
        calls.append(-1.0 if timeout is None else timeout)
        return drain(timeout=timeout)

    consumer.drain_events = counted
    try:
        yield calls
    finally:
        consumer.drain_events = drain


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[Celery]:
    """A plain Celery app (no plugin: the wait is Celery's) with broker and results on ``redis_server``."""
    app = Celery("floor", broker=redis_server.url, backend=redis_server.url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=False, worker_hijack_root_logger=False)
    yield app
    collect_results()
    app.close()


@pytest.mark.parametrize("side", [SIDE])
def test_get_of_a_result_already_received_waits_only_before_celery_5_7(
    side: str, app: Celery, redis_server: RedisServer
) -> None:
    draining_late: list[float] = []
    draining_early: list[float] = []

    @app.task(name="floor.echo")
    def echo(value: str) -> str:
        return value

    @app.task(name="floor.echo_once_drained")
    def echo_once_drained(value: str) -> str:
        # The worker runs in this process: hold late's result back until its
        # get() is draining, so that it is not simply read from the key.
        wait_until(lambda: draining_late, message="the caller to drain for late")
        return value

    results = redis_server.client()
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        early = echo.delay("early")
        # The backend SETs and PUBLISHes a result in one MULTI, and the caller
        # subscribed when it sent the task: once the key exists, early's message
        # is in the caller's pubsub socket, ahead of any message for `late`.
        wait_until(lambda: results.exists(f"celery-task-meta-{early.id}"), message="early's result stored")
        late = echo_once_drained.delay("late")
        with counting_drains(app, draining_late):
            # Draining until late's message comes reads early's first, which
            # the consumer keeps for early (not waited on yet): received.
            assert late.get(timeout=10) == "late"
        with counting_drains(app, draining_early):
            assert early.get(timeout=10) == "early"

    assert draining_late, "late's get() drained nothing: the counter is not on the consumer get() uses"
    if HAS_FIX:
        # 5.7 looks first: the received result is returned without waiting.
        assert draining_early == [], side
    else:
        # Before 5.7: one drain, with the one-second interval, before it looks.
        assert draining_early == [1], side


@pytest.mark.parametrize("side", [SIDE])
def test_the_celery_layer_refuses_a_celery_older_than_the_floor(side: str) -> None:
    """Importing ``celery_dlock.celery`` (which workers, beat and the CLI all do) checks the installed Celery."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import celery_dlock.celery"], check=False, capture_output=True, text=True, timeout=60
    )
    if HAS_FIX:
        assert loaded.returncode == 0, loaded.stderr
    else:
        last = loaded.stderr.strip().splitlines()[-1]
        assert loaded.returncode != 0, side
        assert last.startswith("celery_dlock.celery.compat.UnsupportedCelery: celery_dlock needs Celery 5.7"), last
        assert f"this is Celery {celery.__version__}" in last, last
