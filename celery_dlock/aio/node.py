"""One independent Redis master, reached from an event loop.

An :class:`AsyncNode` has one connection per event loop, made from a URL or
a :class:`redis.asyncio.Redis` client's settings with redis-py's retries off
(as :class:`~celery_dlock.lock.nodes.Node` does), the Lua scripts loaded as
it connects.  Commands to one node run one at a time in the order they were
issued, each bounded by ``socket_timeout``: a fan-out runs every node's
command in a task of its own, so a caller that stops waiting (a quorum is
in, or it was cancelled) leaves the reply to be read in order, and a later
command (the undo of a cancelled attempt) always runs after it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..lock.addresses import SENTINEL_SCHEME, mask_url, resolve
from ..lock.cluster import is_cluster_url
from ..lock.nodes import Reply
from ..lock.resp import pack

__all__ = ["AsyncNode", "NodeSpec"]

logger = logging.getLogger(__name__)

#: What one node may be given as.
NodeSpec = str | redis.asyncio.Redis

#: Connection settings of the caller's that a lock connection must not keep.
_DROPPED: Final = ("connection_pool", "maint_notifications_config", "orig_host_address")


class _Link:
    """A node's connection on one event loop, and the lock that keeps its commands in order."""

    __slots__ = ("conn", "turn", "used")

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.turn = asyncio.Lock()
        self.used = False


class AsyncNode:
    """One Redis master: a ``redis://``, ``rediss://`` or ``unix://`` URL, or a ``redis.asyncio.Redis``."""

    def __init__(self, spec: NodeSpec, *, socket_timeout: float, preload: Sequence[str] = ()) -> None:
        pool = _pool(spec)
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _DROPPED}
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
        self._connection_class = pool.connection_class
        self._kwargs = kwargs
        address = resolve(_sync_url(pool), socket_timeout=socket_timeout)
        #: A printable name with no password.
        self.name = address.name
        #: Equal for two nodes that are the same server.
        self.identity = address.identity
        self.socket_timeout = socket_timeout
        self._preload = b"".join(pack("SCRIPT", "LOAD", source) for source in preload)
        self._preloaded = len(preload)
        self._links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<AsyncNode {self.name}>"

    def new_connection(self, *, read_timeout: float | None = None) -> AbstractConnection:
        """A connection of the caller's own, not yet connected; a subscription's reads wait forever (``None``)."""
        conn: AbstractConnection = self._connection_class(**{**self._kwargs, "socket_timeout": read_timeout})
        return conn

    async def execute(self, packed: bytes) -> Reply:
        """Run one packed command in turn; its reply, or the error (returned, not raised)."""
        link = self._link()
        async with link.turn:
            for _ in range(2):
                try:
                    return await asyncio.wait_for(self._call(link, packed), self.socket_timeout)
                except ResponseError as exc:
                    return exc
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    error = (
                        exc
                        if isinstance(exc, RedisError)
                        else RedisTimeoutError(f"no reply within {self.socket_timeout}s")
                    )
                    await _drop(link.conn)
                    # A connection that worked and now fails was most likely closed by a
                    # restart; every command sent is safe to repeat, so it is sent once more.
                    if not (link.used and isinstance(exc, RedisConnectionError)):
                        return error
                    link.used = False
            return error

    async def close(self) -> None:
        """Close this event loop's connection, if it has one, once the commands sent on it are answered."""
        link = self._links.pop(asyncio.get_running_loop(), None)
        if link is not None:
            async with link.turn:
                await _drop(link.conn)

    def _link(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None:
            link = self._links[loop] = _Link(self.new_connection(read_timeout=self.socket_timeout))
        return link

    async def _call(self, link: _Link, packed: bytes) -> Reply:
        conn = link.conn
        if not conn.is_connected:
            await conn.connect()  # type: ignore[no-untyped-call]
            await self._load_scripts(conn)
        await conn.send_packed_command(packed, check_health=False)
        try:
            reply = await conn.read_response()
        except NoScriptError:
            # Someone ran SCRIPT FLUSH since we connected: load and resend once.
            await self._load_scripts(conn)
            await conn.send_packed_command(packed, check_health=False)
            reply = await conn.read_response()
        link.used = True
        return reply

    async def _load_scripts(self, conn: AbstractConnection) -> None:
        if self._preloaded:
            await conn.send_packed_command(self._preload, check_health=False)
            for _ in range(self._preloaded):
                await conn.read_response()


async def _drop(conn: AbstractConnection) -> None:
    try:
        await conn.disconnect()
    except (RedisError, OSError) as exc:
        logger.debug("disconnecting %r failed: %r", conn, exc)


def _as_redis_error(exc: BaseException, timeout: float) -> RedisError:
    if isinstance(exc, RedisError):
        return exc
    if isinstance(exc, TimeoutError):
        return RedisTimeoutError(f"no reply within {timeout}s")
    return RedisConnectionError(f"{type(exc).__name__}: {exc}")


def _pool(spec: object) -> ConnectionPool:
    """The pool whose connection class and settings reach the node ``spec`` names."""
    if isinstance(spec, redis.asyncio.Redis):
        return spec.connection_pool
    if isinstance(spec, redis.Redis):
        raise TypeError(
            "nodes: a sync redis.Redis client cannot serve AsyncRedlock: give a URL or a redis.asyncio.Redis"
        )
    if not isinstance(spec, str):
        raise TypeError(f"nodes: expected a Redis URL or a redis.asyncio.Redis client, got {type(spec).__name__}")
    if spec.split("://", 1)[0] == SENTINEL_SCHEME or is_cluster_url(spec):
        raise ValueError(
            f"nodes: {mask_url(spec)!r}: AsyncRedlock takes plain redis://, rediss:// and unix:// nodes; "
            "Sentinel and Cluster nodes need the sync Redlock"
        )
    resolve(spec, socket_timeout=1.0)  # the sync parser's checks and messages
    return ConnectionPool.from_url(spec)


def _sync_url(pool: ConnectionPool) -> str:
    """A URL of the node, for its name and identity (no password: neither shows one)."""
    kwargs: dict[str, Any] = pool.connection_kwargs
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
