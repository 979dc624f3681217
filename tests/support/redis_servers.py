"""``redis-server`` nodes for tests that break them: kill, pause, restart, wipe.

:class:`RedisServer` is the package's :class:`~celery_dlock.testing.redis_process.RedisProcess`
(a real child process on a free loopback port, in its own directory,
persistence off unless asked for) plus what fault tests do to a node, and
clients made for provoking failures.  :class:`RedisCluster` groups several
independent masters, the topology Redlock quorums are computed over.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_dlock.testing.process import ManagedProcess
from celery_dlock.testing.redis_process import LOG_NAME, RedisProcess, find_redis_server

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ClusterFactory", "RedisCluster", "RedisServer"]


class RedisServer(RedisProcess):
    """A :class:`RedisProcess` that a test can kill, pause, restart and wipe.

    ``extra_args`` such as ``("--appendonly", "yes", "--appendfsync",
    "always")`` make writes survive :meth:`kill`.  The port stays the same
    across :meth:`restart`.
    """

    def pause(self) -> None:
        """Freeze the server with ``SIGSTOP``; connections stay open but hang."""
        self._running_process().pause()

    def resume(self) -> None:
        """Unfreeze a server frozen by :meth:`pause`."""
        self._running_process().resume()

    def restart(self, wipe: bool = False) -> None:
        """Kill the server and start it again on the same port.

        Args:
            wipe: Delete the data files (RDB snapshots, append-only files)
                before starting, so the server comes back empty even when
                persistence is enabled.
        """
        self.kill()
        if wipe:
            self.wipe()
        self.start()

    def wipe(self) -> None:
        """Delete everything but the log from the server's directory.

        Raises:
            RuntimeError: if the server is running.
        """
        if self.running:
            raise RuntimeError(f"cannot wipe the data of {self!r}")
        for entry in self.dir.iterdir():
            if entry.name == LOG_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client with defaults for tests that provoke failures.

        One-second socket timeouts and no retries; any keyword argument of
        :class:`redis.Redis` overrides them.
        """
        options: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, "retry": Retry(NoBackoff(), 0)}
        return super().client(**{**options, **kwargs})

    def _running_process(self) -> ManagedProcess:
        if self.process is None or not self.running:
            raise RuntimeError(f"{self!r} is not running")
        return self.process


class RedisCluster:
    """A group of independent ``redis-server`` masters.

    This is not Redis Cluster: the nodes share nothing and know nothing of
    each other, which is the deployment Redlock expects.

    Attributes:
        servers: The nodes, in the order they were started.
        extra_args: Arguments given to every node started by :meth:`start`.
    """

    def __init__(self, extra_args: Sequence[str] = (), *, binary: str | None = None) -> None:
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.binary = binary or find_redis_server()
        self.servers: list[RedisServer] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.urls}>"

    def start(self, n: int) -> Self:
        """Start ``n`` more nodes; if one fails, those started by this call are stopped."""
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
                server.stop()
            raise
        self.servers.extend(started)
        return self

    @property
    def urls(self) -> list[str]:
        """The ``redis://`` URLs of the nodes."""
        return [server.url for server in self.servers]

    def clients(self, **kwargs: Any) -> list[redis.Redis]:
        """One client per node; see :meth:`RedisServer.client`."""
        return [server.client(**kwargs) for server in self.servers]

    def stop(self) -> None:
        """Stop every node and delete its directory."""
        while self.servers:
            self.servers.pop().stop()

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.servers)

    def __getitem__(self, index: int) -> RedisServer:
        return self.servers[index]


class ClusterFactory(Protocol):
    """Signature of the ``redis_nodes`` fixture."""

    def __call__(self, n: int, extra_args: Sequence[str] = ()) -> RedisCluster:
        """Start ``n`` nodes, stopped when the test ends."""
