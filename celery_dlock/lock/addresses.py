"""Where a node is: a Redis URL, a Sentinel-managed master, or a redis-py client.

:func:`resolve` turns what the caller gave for one node into an
:class:`Address`: the connection class and settings to copy, a printable name
without the password, and the identity that tells two nodes apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
from redis.connection import ConnectionPool, SSLConnection
from redis.sentinel import Sentinel, SentinelConnectionPool

__all__ = ["SENTINEL_SCHEME", "Address", "mask_url", "parse_url", "refuse_async", "resolve"]

#: The scheme of a Sentinel-managed master: ``sentinel://h1:26379;sentinel://h2:26379/0``.
SENTINEL_SCHEME: Final = "sentinel"

#: The port of a Sentinel given without one.
SENTINEL_PORT: Final = 26379


@dataclass(frozen=True)
class Address:
    """One node's connection settings, printable name and identity."""

    #: A pool whose ``connection_class`` and ``connection_kwargs`` make connections to the node.
    pool: ConnectionPool
    #: A name with no password, such as ``redis://127.0.0.1:6379/0``.
    name: str
    #: Equal for two addresses of the same server (or the same Sentinel-managed master).
    identity: tuple[str, ...]


def resolve(
    spec: str | redis.Redis,
    *,
    socket_timeout: float,
    sentinel_master: str | None = None,
    sentinel_kwargs: Mapping[str, Any] | None = None,
) -> Address:
    """The :class:`Address` of one node: a URL, a Sentinel URL, or a client whose settings are reused."""
    if isinstance(spec, redis.Redis):
        pool = spec.connection_pool
    elif isinstance(spec, str) and spec.split("://", 1)[0] == SENTINEL_SCHEME:
        return _sentinel_address(spec, socket_timeout, sentinel_master, sentinel_kwargs or {})
    elif isinstance(spec, str):
        pool = parse_url(spec)
    else:
        raise TypeError(f"nodes: expected a Redis URL or a redis.Redis client, got {type(spec).__name__}")
    if isinstance(pool, SentinelConnectionPool):  # a client from Sentinel.master_for()
        service = pool.service_name
        addresses = sorted(_sentinel_name(sentinel) for sentinel in pool.sentinel_manager.sentinels)
        return Address(pool, f"sentinel://{','.join(addresses)}/{service}", ("sentinel", service, *addresses))
    kwargs = pool.connection_kwargs
    return Address(pool, _describe(kwargs, pool.connection_class), _identity(kwargs))


def refuse_async(nodes: object) -> None:
    """Raise a ``TypeError`` pointing to ``AsyncRedlock`` if ``nodes`` is, or holds, a ``redis.asyncio`` client."""
    given = nodes if isinstance(nodes, (list, tuple)) else [nodes]
    if any(isinstance(node, redis.asyncio.Redis) for node in given):
        raise TypeError(
            "nodes: a redis.asyncio client cannot serve a sync Redlock; "
            "use celery_dlock.aio.AsyncRedlock, which takes it (or a URL), with await"
        )


def parse_url(url: str) -> ConnectionPool:
    """A connection pool for ``url``; ``ValueError`` naming ``nodes`` if it is malformed."""
    try:
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss"):
            parts.port  # noqa: B018 - raises ValueError on a malformed port
            if not parts.hostname:
                raise ValueError("no host")
        return ConnectionPool.from_url(url)
    except ValueError as exc:
        raise ValueError(f"nodes: malformed Redis URL {mask_url(url)!r}: {exc}") from None


def mask_url(url: str) -> str:
    """``url`` (or each part of a ``;`` list) with its password, if any, shown as ``***``."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _sentinel_address(
    url: str, socket_timeout: float, master: str | None, sentinel_kwargs: Mapping[str, Any]
) -> Address:
    """A Sentinel-managed master: the Sentinels of ``url`` find it, and find it again after a failover."""
    if not master:
        raise ValueError(
            f"nodes: {mask_url(url)!r} names Sentinels but not the master they watch: give sentinel_master= "
            "(for Celery, dlock_sentinel_master or master_name in dlock_transport_options)"
        )
    sentinels: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        try:
            port = parsed.port or SENTINEL_PORT
        except ValueError as exc:
            raise ValueError(f"nodes: malformed Sentinel URL {mask_url(url)!r}: {exc}") from None
        if parsed.scheme != SENTINEL_SCHEME or not parsed.hostname:
            raise ValueError(f"nodes: malformed Sentinel URL {mask_url(url)!r}: each part is sentinel://host:port")
        sentinels.append((parsed.hostname, port))
        if parsed.password and "password" not in options:
            options["password"] = unquote(parsed.password)
            if parsed.username:
                options["username"] = unquote(parsed.username)
        db = parsed.path.strip("/")
        if db and "db" not in options:
            if not db.isdigit():
                raise ValueError(f"nodes: malformed Sentinel URL {mask_url(url)!r}: the db must be a number")
            options["db"] = int(db)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    manager = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, sentinel_kwargs={**timeouts, **sentinel_kwargs}, **timeouts, **options
    )
    pool = manager.master_for(master).connection_pool  # type: ignore[no-untyped-call]
    addresses = sorted(f"{host}:{port}" for host, port in sentinels)
    return Address(pool, f"sentinel://{','.join(addresses)}/{master}", ("sentinel", master, *addresses))


def _sentinel_name(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', SENTINEL_PORT)}"


def _identity(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    if "path" in kwargs:
        return ("unix", os.path.realpath(kwargs["path"]))
    host = str(kwargs.get("host", "localhost")).lower()
    if host in ("localhost", "::1", "[::1]"):
        host = "127.0.0.1"
    return (host, str(kwargs.get("port", 6379)))


def _describe(kwargs: Mapping[str, Any], connection_class: type) -> str:
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if issubclass(connection_class, SSLConnection) else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
