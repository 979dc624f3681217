"""Independent Redis masters: one :class:`Node` each, and the :class:`Member` protocol of a quorum.

Each :class:`Node` owns its connections: one per thread, made from the
caller's URL or client settings but with small socket timeouts and redis-py's
retry layer turned off, because a lock must fail fast and never re-send a
command whose first copy may have taken effect.  Replies left unread by
:func:`~celery_dlock.lock.fanout.fan_out` are counted as stale and skipped
before the next one; a connection the server closed is replaced before it
is written to; and a node that timed out is dialled again only in the
background (:mod:`~celery_dlock.lock.dialer`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import redis
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from .addresses import resolve
from .dialer import Dialer
from .member import NO_REPLY, Connection, Reply, execute
from .process import current_pid
from .resp import pack

__all__ = ["COOLDOWN_MAX", "COOLDOWN_MIN", "MAX_STALE_REPLIES", "Node", "lock_connection_settings"]

logger = logging.getLogger(__name__)

#: After this many unread replies a connection is dropped rather than drained.
MAX_STALE_REPLIES: Final = 32

#: How many keys each SCAN step looks at.
SCAN_COUNT: Final = 1000

#: Back-off between background dials of a node that timed out.
COOLDOWN_MIN: Final = 0.05
COOLDOWN_MAX: Final = 1.0


_MAINTENANCE_KWARGS: Final = (
    "maint_notifications_config",
    "maint_notifications_pool_handler",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
)


class _Link:
    """A connection of one thread to one node, and its unread reply count."""

    __slots__ = ("conn", "owed", "pid", "sent", "stale", "used")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pid = current_pid()
        self.stale = 0
        #: Whether the reply to :attr:`sent` is neither read nor left yet.
        self.owed = False
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
        kwargs.update(lock_connection_settings(socket_timeout), retry=Retry(NoBackoff(), 0))
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
        # After a timeout the node is *suspect*: it is dialled again only in the
        # background (lock/dialer.py), at most once per back-off.
        self._suspect = False
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
        """Send ``packed`` on this thread's connection, connecting if need be.

        A command sent while the last one's reply is still owed (two commands
        to one node in one fan-out) makes that reply stale, to be skipped.
        """
        current: _Link | None = getattr(self._local, "link", None)
        if current is not None and current.owed:
            current.stale += 1
            current.owed = False
        link = self._link()
        link.sent = packed
        try:
            link.conn.send_packed_command([packed], check_health=False)
        except RedisError as exc:
            self._fail(link, exc)
            if not _reconnectable(link, exc):
                raise
            self.send(packed)  # once, on a fresh connection
            return
        link.owed = True

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
            link.owed = False
            return reply
        except ResponseError as exc:
            link.owed = False
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
        return execute(self, packed)

    def abandon(self) -> None:
        """Leave the last reply unread: it is skipped before the next one."""
        link: _Link = self._local.link
        if link.owed:
            link.stale += 1
            link.owed = False

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
        """The calling thread's working connection: the one it has, or a new one.

        A connection that owes no reply but has something to read was closed
        by the server (a restart): it is replaced before anything is written
        to it, where the write would vanish.  A suspect node is dialled only
        in the background; until that dial succeeds, sending to it fails.
        """
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            alive = link.pid == current_pid() and link.conn._sock is not None
            if alive and link.stale > MAX_STALE_REPLIES:
                # Read what has come in first: a busy but live node catches up,
                # and dropping a connection with commands still unread by the
                # server can lose them.
                with contextlib.suppress(RedisError, OSError):
                    self._skip_stale(link, block=False)
            if alive and link.stale <= MAX_STALE_REPLIES:
                if not self._closed_by_peer(link):
                    return link
                logger.debug("node %s closed our connection; dialling again", self.name)
            elif alive:
                self._suspect = True  # it stopped answering
            link.conn.disconnect()  # after a fork this closes our copy only
            del self._local.link
        if self._suspect:
            return self._background_link()
        try:
            conn = self._dial()
        except RedisError as exc:
            if isinstance(exc, RedisTimeoutError):
                self._suspect = True
            raise
        link = self._local.link = _Link(conn)
        return link

    def _closed_by_peer(self, link: _Link) -> bool:
        """Whether the server closed ``link``: past the stale replies already in, it has more to read, or EOF.

        With one stale reply or none (a release not waited for, or nothing:
        the usual case) a poll of the socket says it, and redis-py's buffer is
        empty, since every read stops at the last reply owed.  More stale
        replies take redis-py's own check, which looks in that buffer too, and
        so does eventlet, which has no ``poll`` and whose green ``select``
        goes through its hub (with it, a body's sleep after a CPU-bound
        stretch returned at once in ``tests/celery/test_pools.py``).
        """
        conn = link.conn
        try:
            if link.stale > 1 or not hasattr(select, "poll"):
                if not self._skip_stale(link, block=False):
                    return False  # a stale reply is still on its way: the connection is alive
                return conn.can_read(0)
            sock = conn._sock
            if sock is None:
                return True
            if link.stale:
                if not _readable(sock):
                    return False
                with contextlib.suppress(ResponseError):  # a stale reply's error is not ours
                    conn.read_response()
                link.stale = 0
            return _readable(sock)
        except (RedisError, OSError):
            return True

    def _dial(self) -> Connection:
        """A new connection with the scripts loaded, or the error that stopped it."""
        conn = self.new_connection(handshake=False)
        try:
            conn.connect()
            self._load_scripts(conn)
        except BaseException:
            conn.disconnect()
            raise
        return conn

    def _background_link(self) -> _Link:
        """The connection a background dial made, once it is ready; ``ConnectionError`` until then."""
        dialer: Dialer[Connection] | None = getattr(self._local, "dialer", None)
        if dialer is None or dialer.pid != current_pid():
            if time.monotonic() >= self._cooldown_until:
                self._local.dialer = Dialer(self._dial, self.name)
            raise redis.ConnectionError(f"{self.name} timed out; dialling it again in the background")
        if not dialer.done:
            raise redis.ConnectionError(f"{self.name} timed out; still dialling it again in the background")
        del self._local.dialer
        if dialer.connection is None:
            self._back_off()
            raise redis.ConnectionError(f"{self.name} could not be dialled again: {dialer.error!r}")
        self._suspect = False
        self._cooldown = 0.0
        link = self._local.link = _Link(dialer.connection)
        return link

    def _back_off(self) -> None:
        self._cooldown = min(max(self._cooldown * 2, COOLDOWN_MIN), COOLDOWN_MAX)
        self._cooldown_until = time.monotonic() + self._cooldown

    def _load_scripts(self, conn: Connection) -> None:
        if not self._preloaded:
            return
        conn.send_packed_command([self._preload], check_health=False)
        for _ in range(self._preloaded):
            conn.read_response()

    def _fail(self, link: _Link, exc: BaseException) -> None:
        link.conn.disconnect()
        link.stale = 0
        link.owed = False
        if isinstance(exc, RedisTimeoutError):
            self._suspect = True
            self._back_off()
        logger.debug("node %s failed: %r", self.name, exc)


def lock_connection_settings(socket_timeout: float) -> dict[str, Any]:
    """What a lock's connection overrides in the caller's settings: small timeouts, no retries, RESP2, bytes.

    The caller adds a ``retry`` of no attempts of its own redis-py flavour (sync or asyncio).
    """
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry_on_error": [],
        "retry_on_timeout": False,
        "decode_responses": False,
        "health_check_interval": 0,
        "protocol": 2,
    }


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read now (data or an EOF), in one system call."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _reconnectable(link: _Link, exc: BaseException) -> bool:
    """Whether a failure is the server having closed a connection that worked."""
    return link.used and isinstance(exc, redis.ConnectionError) and not isinstance(exc, RedisTimeoutError)
