"""A Redis Cluster as one lock node: each command goes to the master of its key's slot.

A :class:`ClusterNode` offers what a :class:`~celery_dlock.lock.nodes.Node`
offers (:class:`~celery_dlock.lock.member.Member`), so the quorum and the
fan-out treat a whole Cluster as one node.  It keeps the slot map from
``CLUSTER SLOTS`` and a plain :class:`~celery_dlock.lock.nodes.Node` for each
master, and routes each packed command by its first key
(:func:`~celery_dlock.lock.resp.first_key`).  ``MOVED`` refreshes the map and
resends; ``ASK`` resends once to the importing master behind ``ASKING``; a
master that cannot be reached marks the map stale, so the next command asks
the surviving masters who owns the slot now.  The keyspace gives every key
of one lock a shared hash tag (:class:`~celery_dlock.lock.keyspace.Keyspace`),
so each script's keys are in one slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeGuard
from urllib.parse import SplitResult, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, RedisError

from .addresses import mask_url
from .keyspace import SLOTS, key_slot
from .member import NO_REPLY, Connection, Member, Reply, execute
from .nodes import Node
from .resp import first_key, pack

__all__ = ["CLUSTER_SCHEMES", "ClusterNode", "is_cluster_url", "member", "parse_cluster_url"]

#: The URL schemes of a Redis Cluster: ``redis+cluster://h1:7000,h2:7001``.
CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")

#: The slot map is asked for again at most this often (seconds) while a master is unreachable.
REFRESH_INTERVAL: Final = 0.1


def is_cluster_url(spec: object) -> TypeGuard[str]:
    """Whether ``spec`` is a Redis Cluster URL."""
    return isinstance(spec, str) and spec.split("://", 1)[0] in CLUSTER_SCHEMES


def member(
    spec: str | redis.Redis,
    *,
    socket_timeout: float,
    preload: Sequence[str],
    sentinel: tuple[str | None, Mapping[str, Any] | None] = (None, None),
) -> Member:
    """The quorum member ``spec`` names: a Cluster for a Cluster URL, else a :class:`Node`.

    ``sentinel`` is the master name and Sentinel options of a ``sentinel://`` URL.
    """
    if is_cluster_url(spec):
        return ClusterNode(spec, socket_timeout=socket_timeout, preload=preload)
    master, options = sentinel
    return Node(spec, socket_timeout=socket_timeout, preload=preload, sentinel_master=master, sentinel_kwargs=options)


class ClusterNode:
    """A Redis Cluster, named by ``redis+cluster://[user:password@]host:port[,host:port...][?options]``.

    The hosts are starting points: the masters are found from any of them,
    and found again after a failover or a resharding.  A Cluster has only
    database 0, so a URL naming another is refused.
    """

    def __init__(self, url: str, *, socket_timeout: float, preload: Sequence[str] = ()) -> None:
        parts, addresses = parse_cluster_url(url)
        userinfo = parts.netloc.rpartition("@")[0]
        self._scheme = parts.scheme.split("+", 1)[0]
        self._userinfo = f"{userinfo}@" if userinfo else ""
        self._query = f"?{parts.query}" if parts.query else ""
        self._socket_timeout = socket_timeout
        self._preload = tuple(preload)
        self._masters: dict[str, Node] = {}
        self._startup = [self._master(address) for address in addresses]
        self._slots: list[Node | None] = [None] * SLOTS
        self._stale = True
        self._refreshed_at = 0.0
        self._refresh_lock = threading.Lock()
        self._local = threading.local()
        addresses = sorted(f"{node.identity[0]}:{node.identity[1]}" for node in self._startup)
        #: A printable name with no password, such as ``redis+cluster://127.0.0.1:7000``.
        self.name = f"{parts.scheme}://{','.join(addresses)}"
        #: What makes two nodes the same: the Cluster's starting points.
        self.identity: tuple[str, ...] = ("cluster", *addresses)

    def __repr__(self) -> str:
        return f"<ClusterNode {self.name}>"

    # -- the fan-out protocol ---------------------------------------------------

    def send(self, packed: bytes) -> None:
        """Send ``packed`` to the master of its first key's slot."""
        node = self._route(packed)
        self._local.node = node
        self._local.sent = packed
        try:
            node.send(packed)
        except RedisError:
            self._stale = True
            raise

    def fileno(self) -> int:
        """The descriptor of the connection the last command went to."""
        node: Node = self._local.node
        return node.fileno()

    def read(self, *, block: bool = False) -> Reply:
        """Read the reply to the last command sent, following a redirection."""
        node: Node = self._local.node
        reply = node.read(block=block)
        if reply is NO_REPLY:
            return reply
        if isinstance(reply, MovedError):
            self._stale = True
            self._refresh(force=True)
            return self._resend(self._master(f"{reply.host}:{reply.port}"), self._local.sent)
        if isinstance(reply, AskError):
            return self._resend(self._master(f"{reply.host}:{reply.port}"), self._local.sent, asking=True)
        if isinstance(reply, redis.ConnectionError):
            self._stale = True
        return reply

    def execute(self, packed: bytes) -> Reply:
        """Send one command to the master of its slot and wait for its reply (returned, even if an error)."""
        return execute(self, packed)

    def abandon(self) -> None:
        """Leave the last reply unread: it is skipped before the next one."""
        node: Node = self._local.node
        node.abandon()

    def close(self) -> None:
        """Close this thread's connections to every master."""
        for node in list(self._masters.values()):
            node.close()

    # -- for waiters and operators ----------------------------------------------

    def new_connection(self) -> Connection:
        """A connection of our own to a master: a Cluster carries every PUBLISH to every node."""
        errors: list[BaseException] = []
        for node in self.masters():
            try:
                return node.new_connection()
            except RedisError as exc:
                errors.append(exc)
        raise redis.ConnectionError(f"{self.name}: no master accepted a connection: {errors}")

    def masters(self) -> list[Node]:
        """The masters that own slots, as far as the slot map knows."""
        self._refresh()
        owners = {id(node): node for node in self._slots if node is not None}
        return list(owners.values()) or list(self._startup)

    def scan(self, pattern: str) -> list[bytes]:
        """The names of the keys matching ``pattern`` on every master."""
        return [name for node in self.masters() for name in node.scan(pattern)]

    def client(self, timeout: float) -> RedisCluster:
        """A redis-py :class:`~redis.cluster.RedisCluster` of this Cluster, for operators; the caller closes it."""
        host, port = self._startup[0].identity
        url = f"{self._scheme}://{self._userinfo}{host}:{port}/0{self._query}"
        return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    # -- the slot map -----------------------------------------------------------

    def _route(self, packed: bytes) -> Node:
        if self._stale:
            self._refresh()
        key = first_key(packed)
        node = self._slots[key_slot(key)] if key is not None else None
        if node is None:
            masters = self.masters()
            if key is not None or not masters:
                raise redis.ConnectionError(f"{self.name}: no master is known for slot {key_slot(key or b'')}")
            node = masters[0]
        return node

    def _resend(self, node: Node, packed: bytes, *, asking: bool = False) -> Reply:
        self._local.node = node
        try:
            node.send(pack("ASKING") + packed if asking else packed)
        except RedisError as exc:
            return exc
        if asking:
            node.read(block=True)  # ASKING's OK
        return node.read(block=True)

    def _refresh(self, *, force: bool = False) -> None:
        """Read the slot map again, at most every :data:`REFRESH_INTERVAL` unless ``force``."""
        if not self._stale and not force:
            return
        with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed_at < REFRESH_INTERVAL:
                return
            self._refreshed_at = time.monotonic()
            known = {id(node): node for node in self._slots if node is not None}
            for node in [*known.values(), *self._masters.values()]:
                reply = node.execute(pack("CLUSTER", "SLOTS"))
                if isinstance(reply, BaseException) or not reply:
                    continue
                self._slots = self._slot_map(node, reply)
                self._stale = False
                return

    def _slot_map(self, asked: Node, reply: list[Any]) -> list[Node | None]:
        slots: list[Node | None] = [None] * SLOTS
        for start, end, master, *_replicas in reply:
            host = master[0].decode() if master[0] else asked.identity[0]
            node = self._master(f"{host}:{int(master[1])}")
            slots[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
        return slots

    def _master(self, address: str) -> Node:
        """The :class:`Node` of the master at ``host:port``, made once."""
        node = self._masters.get(address)
        if node is None:
            host, _, port = address.rpartition(":")
            url = f"{self._scheme}://{self._userinfo}{host}:{port}/0{self._query}"
            node = self._masters[address] = Node(url, socket_timeout=self._socket_timeout, preload=self._preload)
        return node


def parse_cluster_url(url: str) -> tuple[SplitResult, list[str]]:
    """The parts of a Redis Cluster URL and its ``host:port`` starting points; ``ValueError`` naming ``nodes``."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"nodes: {mask_url(url)!r} is not a Redis Cluster URL ({' or '.join(CLUSTER_SCHEMES)})")
    db = parts.path.strip("/")
    if db not in ("", "0"):
        raise ValueError(f"nodes: {mask_url(url)!r} names database {db}; a Redis Cluster has only database 0")
    hosts = parts.netloc.rpartition("@")[2]
    addresses = [part.strip() for part in hosts.split(",") if part.strip()]
    if not addresses:
        raise ValueError(f"nodes: {mask_url(url)!r} names no host of the Cluster")
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"nodes: malformed Redis Cluster URL {mask_url(url)!r}: each host is host:port")
    return parts, addresses
