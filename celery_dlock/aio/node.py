"""One independent Redis master, reached from an event loop.

An :class:`AsyncNode` has one pipelined connection per event loop
(:class:`~celery_dlock.aio.wire.Wire`), made from a URL or a
:class:`redis.asyncio.Redis` client's settings, the Lua scripts loaded as it
connects.  :meth:`AsyncNode.submit` writes a command at once and returns
the future of its reply, so a fan-out writes to every node before it waits
for any; commands queued while the connection is being made are written in
the order they came.  :meth:`AsyncNode.expire` ends a reply that took longer
than ``socket_timeout`` and drops the connection, whose later replies could
no longer be matched; the next command dials again.  Subscriptions use
redis-py connections of their own (:meth:`AsyncNode.new_connection`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..lock.addresses import SENTINEL_SCHEME, mask_url, resolve
from ..lock.cluster import is_cluster_url
from ..lock.member import Reply
from ..lock.nodes import lock_connection_settings
from ..lock.resp import pack
from .wire import Wire

__all__ = ["AsyncNode", "NodeSpec"]

logger = logging.getLogger(__name__)

#: What one node may be given as.
NodeSpec = str | redis.asyncio.Redis

#: Connection settings of the caller's that a lock connection must not keep.
_DROPPED: Final = ("connection_pool", "maint_notifications_config", "orig_host_address")


class _Link:
    """A node's connection on one event loop, or the commands waiting for it to be made."""

    __slots__ = ("queued", "wire")

    def __init__(self) -> None:
        self.wire: Wire | None = None
        #: While dialling: the commands to write once connected, in order.
        self.queued: list[tuple[bytes, asyncio.Future[Reply]]] | None = None


class AsyncNode:
    """One Redis master: a ``redis://``, ``rediss://`` or ``unix://`` URL, or a ``redis.asyncio.Redis``."""

    def __init__(self, spec: NodeSpec, *, socket_timeout: float, preload: Sequence[str] = ()) -> None:
        pool = _pool(spec)
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _DROPPED}
        kwargs.update(lock_connection_settings(socket_timeout), retry=Retry(NoBackoff(), 0))
        self._connection_class = pool.connection_class
        self._kwargs = kwargs
        address = resolve(_sync_url(pool), socket_timeout=socket_timeout)
        #: A printable name with no password.
        self.name = address.name
        #: Equal for two nodes that are the same server.
        self.identity = address.identity
        self.socket_timeout = socket_timeout
        self._handshake = _handshake(kwargs)
        self._reload = b"".join(pack("SCRIPT", "LOAD", source) for source in preload)
        self._scripts = len(preload)
        self._links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<AsyncNode {self.name}>"

    def new_connection(self) -> AbstractConnection:
        """A redis-py connection of the caller's own, not yet connected, whose reads wait forever (subscriptions)."""
        conn: AbstractConnection = self._connection_class(**{**self._kwargs, "socket_timeout": None})
        return conn

    def submit(self, packed: bytes) -> asyncio.Future[Reply]:
        """Write one packed command now (or as soon as connected); the future of its reply or error."""
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None:
            link = self._links[loop] = _Link()
        reply: asyncio.Future[Reply] = loop.create_future()
        if link.wire is not None and not link.wire.closed:
            link.wire.request(packed, reply)
        elif link.queued is not None:
            link.queued.append((packed, reply))
        else:
            link.queued = [(packed, reply)]
            link.wire = None
            _keep(loop.create_task(self._dial(link)))
        return reply

    def expire(self, reply: asyncio.Future[Reply]) -> None:
        """End a reply that is late: it becomes a timeout, and the connection is dropped."""
        if not reply.done():
            reply.set_result(RedisTimeoutError(f"no reply from {self.name} within {self.socket_timeout}s"))
        link = self._links.get(asyncio.get_running_loop())
        if link is not None and link.wire is not None:
            link.wire.abort()
            link.wire = None

    async def execute(self, packed: bytes) -> Reply:
        """Send one command and wait for its reply (or the error), up to ``socket_timeout``."""
        reply = self.submit(packed)
        done, _ = await asyncio.wait([reply], timeout=self.socket_timeout)
        if not done:
            self.expire(reply)
        return reply.result()

    async def close(self) -> None:
        """Close this event loop's connection, once the commands written on it are answered."""
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None:
            return
        if link.wire is not None or link.queued is not None:
            await self.execute(pack("PING"))
        del self._links[loop]
        if link.wire is not None:
            await link.wire.close()

    async def _dial(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        wire = Wire(self.name, self._reload, self._scripts)
        kwargs = self._kwargs
        try:
            if "path" in kwargs:
                connect = loop.create_unix_connection(lambda: wire, kwargs["path"])
            else:
                context = _ssl_context(self._connection_class, kwargs)
                connect = loop.create_connection(
                    lambda: wire, kwargs.get("host", "localhost"), kwargs.get("port", 6379), ssl=context
                )
            await asyncio.wait_for(connect, self.socket_timeout)
        except (OSError, asyncio.TimeoutError, RedisError) as exc:
            error = (
                RedisTimeoutError(f"{self.name}: connect timed out")
                if isinstance(exc, TimeoutError)
                else RedisConnectionError(f"{self.name}: {exc}")
            )
            for _, reply in link.queued or ():
                if not reply.done():
                    reply.set_result(error)
            link.queued = None
            return
        handshake, replies = self._handshake
        wire.skip(handshake + self._reload, replies + self._scripts)
        for packed, reply in link.queued or ():
            wire.request(packed, reply)
        link.queued = None
        link.wire = wire


#: Tasks nobody awaits (dials): kept alive until done.
_DIALS: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    _DIALS.add(task)
    task.add_done_callback(_DIALS.discard)


def _handshake(kwargs: dict[str, Any]) -> tuple[bytes, int]:
    """What a new connection sends first (AUTH, SELECT) and how many replies that is."""
    commands = []
    if kwargs.get("password"):
        user = kwargs.get("username")
        commands.append(pack("AUTH", user, kwargs["password"]) if user else pack("AUTH", kwargs["password"]))
    if int(kwargs.get("db") or 0):
        commands.append(pack("SELECT", int(kwargs["db"])))
    return b"".join(commands), len(commands)


def _ssl_context(connection_class: type, kwargs: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context a ``rediss://`` node's redis-py connection would use, else ``None``."""
    if not issubclass(connection_class, SSLConnection):
        return None
    conn = connection_class(**kwargs)
    context: ssl.SSLContext = conn.ssl_context.get()
    return context


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
