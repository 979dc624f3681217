"""Independent Redis masters, and one-thread concurrent fan-out across them.

Each :class:`Node` owns its connections: one per thread, made from the
caller's URL or client settings but with small socket timeouts and redis-py's
retry layer turned off, because a lock must fail fast and never re-send a
command whose first copy may have taken effect.

:func:`fan_out` sends a command to every node before reading any reply, then
reads replies in the order they arrive and stops as soon as the outcome is
decided.  A reply left unread is not lost: the connection counts it as stale
and skips it before the next reply it reads, so a slow or hung node never
delays a decision that a quorum has already made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol, cast

import redis
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from .addresses import resolve
from .resp import pack

__all__ = ["NO_REPLY", "Member", "Node", "Readiness", "Reply", "fan_out"]

logger = logging.getLogger(__name__)

#: Marks a node whose reply had not arrived when the outcome was decided.
NO_REPLY: Final = type("NoReplyType", (), {"__repr__": lambda self: "NO_REPLY"})()

#: A node's answer: the decoded RESP value, the error it raised, or NO_REPLY.
Reply = Any

#: After this many unread replies a connection is dropped rather than drained.
MAX_STALE_REPLIES: Final = 32

#: How many keys each SCAN step looks at.
SCAN_COUNT: Final = 1000

#: Back-off after a timeout, so a hung node is not re-dialled on every call.
COOLDOWN_MIN: Final = 0.05
COOLDOWN_MAX: Final = 1.0


_MAINTENANCE_KWARGS: Final = (
    "maint_notifications_config",
    "maint_notifications_pool_handler",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
)


class Connection(Protocol):
    """The part of a redis-py connection this module uses, typed."""

    _sock: socket.socket | None

    def connect(self) -> None: ...
    def disconnect(self) -> None: ...
    def send_packed_command(self, command: list[bytes], check_health: bool = ...) -> None: ...
    def can_read(self, timeout: float = ...) -> bool: ...
    def read_response(self) -> Any: ...


class Member(Protocol):
    """One member of a quorum: a :class:`Node`, or a whole Redis Cluster (:mod:`.cluster`)."""

    #: A printable name with no password.
    name: str
    #: Equal for two members that are the same server, Sentinel master or Cluster.
    identity: tuple[str, ...]

    def send(self, packed: bytes) -> None:
        """Send one packed command."""
        ...

    def fileno(self) -> int:
        """The descriptor the reply to the last command arrives on."""
        ...

    def read(self, *, block: bool = False) -> Reply:
        """The reply to the last command, or :data:`NO_REPLY` if not in yet and not ``block``."""
        ...

    def abandon(self) -> None:
        """Leave the last reply unread."""
        ...

    def execute(self, packed: bytes) -> Reply:
        """Send one command and wait for its reply."""
        ...

    def close(self) -> None:
        """Close this thread's connections."""
        ...

    def new_connection(self) -> Connection:
        """A connected connection of the caller's own, for subscriptions."""
        ...

    def scan(self, pattern: str) -> list[bytes]:
        """The names of the keys matching ``pattern`` (on a Cluster, on every master)."""
        ...

    def client(self, timeout: float) -> Any:
        """A redis-py client, for operators; the caller closes it."""
        ...


class _Link:
    """A connection of one thread to one node, and its unread reply count."""

    __slots__ = ("conn", "pid", "sent", "stale", "used")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.stale = 0
        self.sent = b""
        #: Whether a reply has come back on it: a connection that has worked
        #: before and fails now was most likely closed by a server restart.
        self.used = False


class Node:
    """One independent Redis master.

    ``spec`` is a ``redis://``, ``rediss://`` or ``unix://`` URL, or a
    :class:`redis.Redis` client whose connection settings are reused (its own
    pool is left untouched).  Every thread gets its own connection, made on
    first use; after :func:`os.fork` the child makes new ones.  The Lua
    ``preload`` sources are loaded on every connection as it connects.
    """

    def __init__(
        self,
        spec: str | redis.Redis,
        *,
        socket_timeout: float,
        preload: Sequence[str] = (),
        sentinel_master: str | None = None,
        sentinel_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        address = resolve(
            spec, socket_timeout=socket_timeout, sentinel_master=sentinel_master, sentinel_kwargs=sentinel_kwargs
        )
        pool = address.pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            retry_on_timeout=False,
            decode_responses=False,
            health_check_interval=0,
            protocol=2,
        )
        # Cluster maintenance hooks (redis-py 7+) need RESP3 and rewrite timeouts.
        for name in _MAINTENANCE_KWARGS:
            kwargs.pop(name, None)
        self._connection_class = pool.connection_class
        self._connection_kwargs = kwargs
        # A Sentinel pool's connections reach it through a weak reference.
        self._pool = pool
        #: A printable name with no password, such as ``redis://127.0.0.1:6379/0``.
        self.name = address.name
        #: What makes two nodes the same server: the host and port, the socket
        #: path, or the Sentinel-managed master.
        self.identity = address.identity
        self._preload = b"".join(pack("SCRIPT", "LOAD", source) for source in preload)
        self._preloaded = len(preload)
        self._local = threading.local()
        self._cooldown_until = 0.0
        self._cooldown = 0.0

    def __repr__(self) -> str:
        return f"<Node {self.name}>"

    def client(self, timeout: float) -> redis.Redis:
        """A redis-py client of this node, for operators; the caller closes it.

        Its connections are made as the lock's own are (the same class and
        settings: to a Sentinel-managed master, connections that ask the
        Sentinels), in a pool of its own, with socket timeouts of
        ``timeout`` seconds and no retries.
        """
        kwargs = {**self._connection_kwargs, "socket_timeout": timeout, "socket_connect_timeout": timeout}
        kwargs.pop("connection_pool", None)  # a Sentinel connection's way back to its pool: the new pool sets its own
        pool: ConnectionPool
        if isinstance(self._pool, SentinelConnectionPool):
            pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                self._pool.service_name, self._pool.sentinel_manager, connection_class=self._connection_class, **kwargs
            )
        else:
            pool = ConnectionPool(connection_class=self._connection_class, **kwargs)
        return redis.Redis(connection_pool=pool)

    def new_connection(self, *, handshake: bool = True) -> Connection:
        """A connection of our own to this node, connected unless ``handshake`` is false."""
        conn = cast(Connection, self._connection_class(**self._connection_kwargs))
        if handshake:
            conn.connect()
        return conn

    # -- the fan-out protocol: send, then read ---------------------------

    def send(self, packed: bytes) -> None:
        """Send ``packed`` on this thread's connection, connecting if need be."""
        if time.monotonic() < self._cooldown_until:
            raise redis.ConnectionError(f"{self.name} is cooling down after a timeout")
        link = self._link()
        link.sent = packed
        try:
            link.conn.send_packed_command([packed], check_health=False)
        except RedisError as exc:
            self._fail(link, exc)
            if not _reconnectable(link, exc):
                raise
            self.send(packed)  # once, on a fresh connection

    def fileno(self) -> int:
        """The file descriptor of this thread's connection, for polling."""
        fd: int = self._local.link.conn._sock.fileno()
        return fd

    def read(self, *, block: bool = False) -> Reply:
        """Read the reply to the last command sent, skipping stale ones first.

        Unless ``block`` is true, returns :data:`NO_REPLY` when only stale
        replies had arrived.  Errors are returned, not raised; a connection
        error also drops the connection.
        """
        link: _Link = self._local.link
        conn = link.conn
        try:
            if link.stale and not self._skip_stale(link, block):
                return NO_REPLY
            try:
                reply = conn.read_response()
            except NoScriptError:
                # Someone ran SCRIPT FLUSH since we connected: load and resend once.
                self._load_scripts(conn)
                conn.send_packed_command([link.sent], check_health=False)
                reply = conn.read_response()
            link.used = True
            return reply
        except ResponseError as exc:
            return exc
        except RedisError as exc:
            self._fail(link, exc)
            if not _reconnectable(link, exc):
                return exc
        # Every command sent is safe to repeat (acquire is idempotent for its
        # owner; release and extend check the owner), so resend it once.
        try:
            self.send(link.sent)
        except RedisError as exc:
            return exc
        return self.read(block=True)

    def _skip_stale(self, link: _Link, block: bool) -> bool:
        """Read past unread older replies; False if ours cannot be read yet."""
        conn = link.conn
        while link.stale:
            if not block and not conn.can_read(0):
                return False
            with contextlib.suppress(ResponseError):  # a stale reply's error is not ours
                conn.read_response()
            link.stale -= 1
        return block or conn.can_read(0)

    def execute(self, packed: bytes) -> Reply:
        """Send one command and wait for its reply (returned, even if an error)."""
        try:
            self.send(packed)
        except RedisError as exc:
            return exc
        return self.read(block=True)

    def abandon(self) -> None:
        """Leave the last reply unread: it is skipped before the next one."""
        link: _Link = self._local.link
        link.stale += 1

    def scan(self, pattern: str) -> list[bytes]:
        """The names of the keys matching ``pattern``; raises the error of a node that failed."""
        names: list[bytes] = []
        cursor: bytes | int = 0
        while True:
            reply = self.execute(pack("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT))
            if isinstance(reply, BaseException):
                raise reply
            cursor, found = reply
            names += found
            if cursor in (b"0", 0):
                return names

    def close(self) -> None:
        """Close this thread's connection, if it has one."""
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            link.conn.disconnect()
            del self._local.link

    # -- internals ---------------------------------------------------------

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None and link.pid == os.getpid() and link.stale <= MAX_STALE_REPLIES:
            if link.conn._sock is not None:
                return link
            link.stale = 0
        elif link is not None:
            link.conn.disconnect()  # after a fork this closes our copy only
        conn = self.new_connection(handshake=False)
        link = self._local.link = _Link(conn)
        try:
            conn.connect()
            self._load_scripts(conn)
        except RedisError as exc:
            self._fail(link, exc)
            raise
        self._cooldown = 0.0
        return link

    def _load_scripts(self, conn: Connection) -> None:
        if not self._preloaded:
            return
        conn.send_packed_command([self._preload], check_health=False)
        for _ in range(self._preloaded):
            conn.read_response()

    def _fail(self, link: _Link, exc: BaseException) -> None:
        link.conn.disconnect()
        link.stale = 0
        if isinstance(exc, RedisTimeoutError):
            self._cooldown = min(max(self._cooldown * 2, COOLDOWN_MIN), COOLDOWN_MAX)
            self._cooldown_until = time.monotonic() + self._cooldown
        logger.debug("node %s failed: %r", self.name, exc)


def _reconnectable(link: _Link, exc: BaseException) -> bool:
    """Whether a failure is the server having closed a connection that worked."""
    return link.used and isinstance(exc, redis.ConnectionError) and not isinstance(exc, RedisTimeoutError)


def fan_out(
    calls: Sequence[tuple[Member, bytes]],
    *,
    decided: Callable[[list[Reply]], bool],
    timeout: float,
) -> list[Reply]:
    """Send every call at once, then gather replies until ``decided`` says so.

    ``decided`` is given the replies so far, aligned with ``calls``, each one a
    value, an exception or :data:`NO_REPLY`.  Nodes still silent when it
    returns true keep :data:`NO_REPLY`; nodes silent after ``timeout`` seconds
    get a :class:`redis.TimeoutError`.  Either way their replies are skipped on
    the next use.
    """
    replies: list[Reply] = [NO_REPLY] * len(calls)
    waiting: list[int] = []
    for index, (node, packed) in enumerate(calls):
        try:
            node.send(packed)
        except RedisError as exc:
            replies[index] = exc
        else:
            waiting.append(index)

    if not waiting or decided(replies):
        for index in waiting:
            calls[index][0].abandon()
        return replies
    if len(calls) == 1:
        replies[0] = calls[0][0].read(block=True)
        return replies

    deadline = time.monotonic() + timeout
    readiness = Readiness()
    by_fd: dict[int, int] = {}
    for index in waiting:
        fd = calls[index][0].fileno()
        by_fd[fd] = index
        readiness.add(fd)
    while waiting and not decided(replies):
        left = deadline - time.monotonic()
        ready = readiness.wait(left) if left > 0 else []
        if not ready:
            for index in waiting:
                replies[index] = RedisTimeoutError(f"no reply within {timeout}s")
            break
        for fd in ready:
            found = by_fd.get(fd)
            if found is None or found not in waiting:
                continue  # eventlet's green select can report a descriptor it was not given
            index = found
            reply = calls[index][0].read()
            if reply is not NO_REPLY:
                replies[index] = reply
                waiting.remove(index)
                readiness.remove(fd)
    for index in waiting:
        calls[index][0].abandon()
    return replies


class Readiness:
    """Which of some sockets have data to read: ``poll`` where the pool has it, else ``select``.

    Eventlet's green ``select`` module has no ``poll``, and it replaces the
    real one in place when it monkey-patches, so the choice is made per use.
    gevent's green ``poll`` and the standard one are used as they are.
    """

    __slots__ = ("_fds", "_poller")

    def __init__(self) -> None:
        poll = getattr(select, "poll", None)
        self._poller = poll() if poll is not None else None
        self._fds: set[int] = set()

    def add(self, fd: int) -> None:
        """Watch ``fd`` for data."""
        if self._poller is not None:
            self._poller.register(fd, select.POLLIN)
        self._fds.add(fd)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``."""
        if self._poller is not None:
            self._poller.unregister(fd)
        self._fds.discard(fd)

    def wait(self, timeout: float) -> list[int]:
        """The watched descriptors with data, waiting up to ``timeout`` seconds for one."""
        if self._poller is not None:
            return [fd for fd, _ in self._poller.poll(timeout * 1000)]
        readable, _, _ = select.select(list(self._fds), [], [], timeout)
        return readable
