"""Throwaway Redis Cluster deployments: three masters and a replica of each, on loopback.

:class:`ClusterTopology` starts every node as a
:class:`~celery_dlock.testing.redis_process.RedisProcess` in cluster mode on a
free loopback port, joins them with ``redis-cli --cluster create``, and waits
until every node reports ``cluster_state:ok``, all 16384 slots assigned and
the same slot map.  :meth:`~ClusterTopology.failover` then runs ``CLUSTER
FAILOVER`` on a replica (the planned switch), :meth:`~ClusterTopology.kill_master`
kills a master (the unplanned one), and :meth:`~ClusterTopology.restart` brings
a killed node back, as a replica.  Its :attr:`~ClusterTopology.url` is
``redis+cluster://127.0.0.1:<port of a master>``.

A master holds back ``cluster_state:ok`` for two seconds after it starts
(Redis's ``CLUSTER_WRITABLE_DELAY``), which covers the second ``redis-cli``
waits for the nodes to meet: a topology is ready about two seconds after it
is started.

Only the standard library and redis-py are imported: no pytest, no Celery.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.retry import Retry

from .polling import wait_until
from .process import Lifecycle, ManagedProcess, ProcessError, log_tails
from .redis_process import HOST, RedisProcess, find_redis_cli, find_redis_server, free_port

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["NODE_TIMEOUT_MS", "SLOTS", "ClusterTopology"]

#: The hash slots of a cluster; every one is owned by exactly one master.
SLOTS: Final = REDIS_CLUSTER_HASH_SLOTS

#: A node silent this long (ms) is suspected (``fail?``) by its peers; a
#: majority of masters suspecting it marks it failed, and its replica runs
#: for election 0.5 to 1 s later.
NODE_TIMEOUT_MS: Final = 1000

#: Each node's cluster state file, in its directory (``--dir``, which a
#: relative path is resolved against): a killed node restarted with it comes
#: back under its old id, and turns into a replica of whoever took its slots.
CONFIG_NAME: Final = "nodes.conf"

#: Cluster mode.  A replica runs for election however long its master link
#: has been down (validity factor 0); no replica moves to another master.
CLUSTER_ARGS: Final = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", CONFIG_NAME,
    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
    "--cluster-replica-validity-factor", "0",
    "--cluster-allow-replica-migration", "no",
    "--appendonly", "no",
)  # fmt: skip

#: Full resynchronisations over the socket, at once: a replica is in sync
#: within milliseconds of starting, and again after a failover.
REPLICATION_ARGS: Final = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")

#: The longest ``redis-cli --cluster create`` may take (s); it sleeps one
#: second itself, and one more for each look at nodes that have not met yet.
CREATE_TIMEOUT: Final = 20.0

#: The topology's own clients: one-second timeouts, no retries.
_FAIL_FAST: Final[dict[str, Any]] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "retry": Retry(NoBackoff(), 0),
}


class _Entry(NamedTuple):
    """One line of ``CLUSTER NODES``: a node as one node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def role(self) -> str:
        return "master" if "master" in self.flags else "replica"

    @property
    def suspected(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


class ClusterTopology(Lifecycle):
    """Three masters and a replica of each, a Redis Cluster of real processes on free loopback ports.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    Roles change with :meth:`failover`, :meth:`kill_master` and
    :meth:`restart`: :attr:`masters` and :attr:`replicas` read them again
    each time, from the cluster.

    Arguments:
        shards: How many masters (at least three), each with one replica.
        server_args: More ``redis-server`` arguments for every node.
        server_class: The class of the nodes, a :class:`RedisProcess` (or a
            subclass with more faults to inject).
        binary: The ``redis-server`` executable; by default ``find_redis_server()``.
        cli: The ``redis-cli`` executable; by default :func:`find_redis_cli`.

    Attributes:
        servers: Every node, in the order they started (the first ``shards``
            were the masters at the start).

    """

    def __init__(
        self,
        *,
        shards: int = 3,
        server_args: Sequence[str] = (),
        server_class: type[RedisProcess] = RedisProcess,
        binary: str | None = None,
        cli: str | None = None,
    ) -> None:
        if shards < 3:
            raise ValueError(f"a Redis Cluster needs at least three masters, got {shards}")
        self.shards = shards
        self.server_args = (*CLUSTER_ARGS, *REPLICATION_ARGS, *server_args)
        self.server_class = server_class
        self.binary = binary or find_redis_server()
        self.cli = cli or find_redis_cli(self.binary)
        self.servers: list[RedisProcess] = []
        self._ids: dict[int, str] = {}
        self._server_clients: dict[int, redis.Redis] = {}
        self._cluster_clients: list[RedisCluster] = []

    def __repr__(self) -> str:
        state = f"nodes on {[server.port for server in self.servers]}" if self.running else "stopped"
        return f"<{type(self).__name__} {state}>"

    # -- where things are ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether every node of the topology is running."""
        return bool(self.servers) and all(server.running for server in self.servers)

    @property
    def url(self) -> str:
        """The cluster as one URL, through its first master: ``redis+cluster://127.0.0.1:<port>``."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        """One ``redis+cluster://`` URL per master, in slot order."""
        return [f"redis+cluster://{HOST}:{master.port}" for master in self.masters]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every running node, what a cluster client discovers the rest from."""
        return [(HOST, server.port) for server in self.servers if server.running]

    @property
    def masters(self) -> list[RedisProcess]:
        """The running nodes that own slots now, the owner of slot 0 first."""
        owners = sorted((entry.slots[0][0], entry.node_id) for entry in self._view() if entry.slots)
        return [server for _, node_id in owners if (server := self._by_id(node_id)).running]

    @property
    def replicas(self) -> list[RedisProcess]:
        """The running nodes that are replicas now, in the order of their masters."""
        return [replica for master in self.masters if (replica := self._replica_or_none(master)) is not None]

    def node_id(self, server: RedisProcess) -> str:
        """The cluster node id of ``server`` (40 hex digits); it survives :meth:`restart`."""
        if server.port not in self._ids:
            self._ids[server.port] = str(self._client_of(server).execute_command("CLUSTER", "MYID"))  # type: ignore[no-untyped-call]
        return self._ids[server.port]

    def master_for_slot(self, slot: int) -> RedisProcess:
        """The node that owns hash slot ``slot`` now."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"no hash slot {slot}: they are 0 to {SLOTS - 1}")
        if (owner := _owner(self._view(), slot)) is None:
            raise LookupError(f"no node of {self!r} owns slot {slot}")
        return self._by_id(owner)

    def master_for_key(self, key: str) -> RedisProcess:
        """The node that owns the hash slot of ``key`` (its ``{hash tag}`` if it has one)."""
        return self.master_for_slot(key_slot(key.encode()))

    def replica_of(self, master: RedisProcess) -> RedisProcess:
        """The running replica of ``master``."""
        if (replica := self._replica_or_none(master)) is None:
            raise LookupError(f"{master!r} has no running replica in {self!r}")
        return replica

    # -- starting and stopping --------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start the nodes, join them with ``redis-cli --cluster create``, and wait until they agree.

        If anything fails to start or agree within ``timeout`` seconds, every
        node started so far is stopped and the error raised.
        """
        try:
            for _ in range(2 * self.shards):
                server = self.server_class(self._node_args(), binary=self.binary)
                self.servers.append(server)
                server.start()
            self._create()
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every node, close the clients made of it, and delete its directory."""
        while self._cluster_clients:
            self._cluster_clients.pop().close()
        for server in self.servers:
            server.stop()  # closes the clients made of it
        self._server_clients = {}

    def wait_settled(self, timeout: float = 20.0) -> None:
        """Wait until the running nodes agree, and the cluster serves every slot.

        That is, every running node reports ``cluster_state:ok`` with every
        slot served, sees the same slot owners, roles and masters as the
        others, suspects no running node, and (if a replica) replicates.
        """
        wait_until(self._settled, timeout, interval=0.02, message=lambda: f"the cluster to settle\n{self.logs()}")

    # -- failover -------------------------------------------------------------------------

    def failover(self, slot: int, timeout: float = 20.0) -> RedisProcess:
        """Run ``CLUSTER FAILOVER`` on the replica of ``slot``'s master; returns it, the new master.

        The master stops its clients until the replica has caught up, so
        nothing acknowledged is lost.  Done means that every node sees the
        replica own ``slot``, the old master as its replica, and the cluster
        settled (see :meth:`wait_settled`).
        """
        self.wait_settled(timeout)
        old = self.master_for_slot(slot)
        new = self.replica_of(old)
        self._client_of(new).execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        self._wait_owner(slot, new, timeout, what=f"CLUSTER FAILOVER of slot {slot} to {new!r}", follower=old)
        return new

    def kill_master(self, slot: int, timeout: float = 20.0) -> RedisProcess:
        """``SIGKILL`` the master of ``slot``; wait until its replica is elected and the survivors settle.

        Returns the promoted replica.  The killed node stays down, its
        directory kept, until :meth:`restart`.  What its replica had not
        received is lost, as in production.
        """
        self.wait_settled(timeout)
        old = self.master_for_slot(slot)
        new = self.replica_of(old)
        self.node_id(old)  # remembered, for restart()
        old.kill()
        self._wait_owner(slot, new, timeout, what=f"{new!r} to be elected in place of the killed {old!r}")
        return new

    def restart(self, server: RedisProcess, timeout: float = 20.0) -> RedisProcess:
        """Start a killed node again on its port and wait until it is a replica and the cluster settles.

        It comes back under its old id (from its ``nodes.conf``), sees that
        its slots have a newer owner, and replicates that owner.
        """
        if server not in self.servers:
            raise LookupError(f"{server!r} is not a node of {self!r}")
        if server.running:
            server.kill()
        server.start()
        self.wait_settled(timeout)
        return server

    # -- using it ------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> RedisCluster:
        """A new cluster client, closed by :meth:`stop` if not before: one-second timeouts, one retry.

        Keyword arguments of :class:`redis.cluster.RedisCluster` override those.
        """
        options: dict[str, Any] = {
            "startup_nodes": [ClusterNode(host, port) for host, port in self.startup_nodes],  # type: ignore[no-untyped-call]
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 1),
        }
        client = RedisCluster(**{**options, **kwargs})
        self._cluster_clients.append(client)
        return client

    def flushall(self) -> None:
        """Delete every key on every master (the replicas follow)."""
        for master in self.masters:
            master.flushall()

    def logs(self, lines: int = 15) -> str:
        """The tail of every node's log, each under its name."""
        return log_tails([server.process for server in self.servers if server.process is not None], lines)

    # -- internals ------------------------------------------------------------------------

    def _node_args(self) -> tuple[str, ...]:
        # The bus port is picked like the data port, not left at port + 10000,
        # which may not exist, or may belong to someone else.
        return (*self.server_args, "--cluster-port", str(free_port()))

    def _create(self) -> None:
        """Join the nodes with ``redis-cli --cluster create``, which makes the first ``shards`` the masters."""
        addresses = [f"{HOST}:{server.port}" for server in self.servers]
        command = [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"]
        log = self.servers[0].dir / "cluster-create.log"
        process = ManagedProcess(command, log_path=log, name="redis-cli --cluster create").start()
        try:
            status = process.wait(CREATE_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            raise ProcessError(f"redis-cli --cluster create did not finish:\n{process.log_tail()}") from None
        process.kill()  # reaps it, and forgets it
        if status != 0:
            raise ProcessError(f"redis-cli --cluster create exited with {status}:\n{process.log_tail()}")

    def _wait_owner(
        self, slot: int, owner: RedisProcess, timeout: float, *, what: str, follower: RedisProcess | None = None
    ) -> None:
        """Wait until the cluster settles with ``owner`` owning ``slot``, and ``follower`` replicating it."""
        owner_id = self.node_id(owner)
        follower_id = self.node_id(follower) if follower is not None else None

        def done(entries: list[_Entry]) -> bool:
            masters = {entry.node_id: entry.master_id for entry in entries}
            return _owner(entries, slot) == owner_id and (follower_id is None or masters.get(follower_id) == owner_id)

        wait_until(lambda: self._settled(done), timeout, interval=0.02, message=lambda: f"{what}\n{self.logs()}")

    def _settled(self, check: Callable[[list[_Entry]], bool] | None = None) -> bool:
        """Whether the running nodes agree (see :meth:`wait_settled`), and ``check`` their common view."""
        running = [server for server in self.servers if server.running]
        try:
            live = {self.node_id(server) for server in running}
            seen: set[frozenset[tuple[object, ...]]] = set()
            for server in running:
                client = self._client_of(server)
                info = self._cluster_info(server)
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != SLOTS:
                    return False
                entries = self._view(server)
                if any(entry.suspected for entry in entries if entry.node_id in live):
                    return False
                if check is not None and not check(entries):
                    return False
                mine = next(entry for entry in entries if "myself" in entry.flags)
                if mine.role == "replica" and client.info("replication").get("master_link_status") != "up":
                    return False
                seen.add(frozenset((e.node_id, e.role, e.master_id, e.slots) for e in entries if e.node_id in live))
            return len(seen) == 1
        except (redis.RedisError, StopIteration):
            return False

    def _cluster_info(self, server: RedisProcess) -> dict[str, str]:
        text = self._client_of(server).execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)

    def _view(self, server: RedisProcess | None = None) -> list[_Entry]:
        """``CLUSTER NODES`` as ``server`` sees it, by default the first running node that answers."""
        candidates = [server] if server is not None else [s for s in self.servers if s.running]
        for candidate in candidates:
            try:
                text = self._client_of(candidate).execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
            except redis.RedisError:
                if server is not None:
                    raise
                continue
            return [_parse_line(line) for line in str(text).splitlines() if line.strip()]
        raise redis.ConnectionError(f"no node of {self!r} answered")

    def _by_id(self, node_id: str) -> RedisProcess:
        for server in self.servers:
            if self._ids.get(server.port) == node_id or (server.running and self.node_id(server) == node_id):
                return server
        raise LookupError(f"no node of {self!r} has id {node_id}")

    def _replica_or_none(self, master: RedisProcess) -> RedisProcess | None:
        master_id = self.node_id(master)
        for entry in self._view():
            if entry.master_id == master_id and entry.role == "replica" and not entry.suspected:
                server = self._by_id(entry.node_id)
                if server.running:
                    return server
        return None

    def _client_of(self, server: RedisProcess) -> redis.Redis:
        if server.port not in self._server_clients:
            self._server_clients[server.port] = server.client(decode_responses=True, **_FAIL_FAST)
        return self._server_clients[server.port]


def _parse_line(line: str) -> _Entry:
    """``<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`` as an :class:`_Entry`."""
    fields = line.split()
    port = int(fields[1].split("@", 1)[0].rsplit(":", 1)[1])
    slots = []
    for spec in fields[8:]:
        if spec.startswith("["):  # a slot being migrated or imported
            continue
        start, _, end = spec.partition("-")
        slots.append((int(start), int(end or start)))
    master = None if fields[3] == "-" else fields[3]
    return _Entry(fields[0], port, frozenset(fields[2].split(",")), master, tuple(sorted(slots)))


def _owner(entries: list[_Entry], slot: int) -> str | None:
    """The id of the node that owns ``slot`` in a view, if any."""
    for entry in entries:
        if any(start <= slot <= end for start, end in entry.slots):
            return entry.node_id
    return None
