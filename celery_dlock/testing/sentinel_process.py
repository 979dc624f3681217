"""Throwaway Redis Sentinel deployments: one master, its replica, and three Sentinels watching them.

:class:`SentinelTopology` starts every process as a
:class:`~celery_dlock.testing.redis_process.RedisProcess` on a free loopback
port and waits until the Sentinels agree on the master and its replica;
:meth:`~SentinelTopology.failover` then runs ``SENTINEL FAILOVER`` and waits
for the switch.  Its :attr:`~SentinelTopology.url` is what ``Redlock`` and
Celery take (``sentinel://h:p1;sentinel://h:p2;sentinel://h:p3``), with
:attr:`~SentinelTopology.master_name`.

Each Sentinel is told its peers and the replica in its configuration file, so
that it does not have to discover them (Sentinels announce themselves every
two seconds): a topology is ready a fraction of a second after it is started.

Only the standard library and redis-py are imported: no pytest, no Celery.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .polling import wait_until
from .process import Lifecycle, log_tails
from .redis_process import HOST, RedisProcess

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_MASTER_NAME", "SentinelProcess", "SentinelTopology"]

#: The name the Sentinels know the master by.
DEFAULT_MASTER_NAME: Final = "dlock-master"

#: A master silent this long (ms) is subjectively down for a Sentinel.
DOWN_AFTER_MS: Final = 1000
#: A failover that has not completed within this long (ms) is aborted.
FAILOVER_TIMEOUT_MS: Final = 5000

#: Full resynchronisations over the socket, at once: a replica is in sync
#: within milliseconds of starting, and again after a failover.
REPLICATION_ARGS: Final = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")

#: A Sentinel promotes only a replica whose INFO it read this recently (ms);
#: it reads each one's every ten seconds.
INFO_VALIDITY_MS: Final = 30_000

#: A channel published on the master to see the replicas catch up, and how
#: long (ms) each look waits for their acknowledgements.
PROBE_CHANNEL: Final = "__dlock_topology__:probe"
PROBE_WAIT_MS: Final = 100

#: The topology's own clients: one-second timeouts, no retries.
_FAIL_FAST: Final[dict[str, Any]] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "retry": Retry(NoBackoff(), 0),
}


class SentinelProcess(RedisProcess):
    """A ``redis-server --sentinel`` on a free loopback port, watching one master.

    Its configuration file, in its directory, names the master, the
    replicas and the other Sentinels (see :meth:`introduce`); the Sentinel
    rewrites it as it learns, so a restarted Sentinel remembers the topology.
    """

    def __init__(
        self,
        master_name: str,
        master_port: int,
        *,
        quorum: int,
        replica_ports: Sequence[int] = (),
        binary: str | None = None,
    ) -> None:
        super().__init__(binary=binary)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.replica_ports = tuple(replica_ports)
        #: The Sentinel's run id, fixed so that its peers can be told it.
        self.run_id = secrets.token_hex(20)
        self.config_path = self.dir / "sentinel.conf"
        self._peers: list[SentinelProcess] = []

    def introduce(self, peers: Sequence[SentinelProcess]) -> None:
        """Name the other Sentinels in the configuration written at the first start."""
        self._peers = [peer for peer in peers if peer is not self]

    def config(self) -> str:
        """The configuration file's text: the master, its replicas, the other Sentinels."""
        name = self.master_name
        lines = [
            f"sentinel myid {self.run_id}",
            f"sentinel monitor {name} {HOST} {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
            *(f"sentinel known-replica {name} {HOST} {port}" for port in self.replica_ports),
            *(f"sentinel known-sentinel {name} {HOST} {peer.port} {peer.run_id}" for peer in self._peers),
        ]
        return "\n".join(lines) + "\n"

    def command(self) -> list[str]:
        """The server's command line in Sentinel mode: the configuration file comes first."""
        if not self.config_path.exists():
            self.config_path.write_text(self.config())
        return [self.binary, str(self.config_path), "--sentinel", *super().command()[1:]]


class SentinelTopology(Lifecycle):
    """A master, one replica and three Sentinels (quorum 2), each a process on a free loopback port.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Arguments:
        master_name: The name the Sentinels watch the master under.
        sentinels: How many Sentinels; the quorum is a majority of them.
        server_args: More ``redis-server`` arguments for the master and the replica.
        server_class: The class of the master and the replica, a
            :class:`RedisProcess` (or a subclass with more faults to inject).
        binary: The ``redis-server`` executable; by default ``find_redis_server()``.

    Attributes:
        servers: The master and the replica, in the order they started (the
            first was the master at the start; see :attr:`master` for now).
        sentinels: The Sentinels.

    """

    def __init__(
        self,
        master_name: str = DEFAULT_MASTER_NAME,
        *,
        sentinels: int = 3,
        server_args: Sequence[str] = (),
        server_class: type[RedisProcess] = RedisProcess,
        binary: str | None = None,
    ) -> None:
        self.master_name = master_name
        self.sentinel_count = sentinels
        self.server_args = (*REPLICATION_ARGS, *server_args)
        self.server_class = server_class
        self.binary = binary
        self.servers: list[RedisProcess] = []
        self.sentinels: list[SentinelProcess] = []
        self._clients: list[redis.Redis] = []
        self._server_clients: dict[int, redis.Redis] = {}

    def __repr__(self) -> str:
        state = f"master on {self._known_master_port()}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.master_name!r} {state}>"

    # -- where things are ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The Sentinels as one URL: ``sentinel://127.0.0.1:p1;sentinel://127.0.0.1:p2;...``."""
        return ";".join(f"sentinel://{HOST}:{sentinel.port}" for sentinel in self.sentinels)

    @property
    def running(self) -> bool:
        """Whether every process of the topology is running."""
        processes = [*self.servers, *self.sentinels]
        return bool(processes) and all(process.running for process in processes)

    @property
    def master_port(self) -> int:
        """The port of the master, as the first Sentinel that answers reports it."""
        for client in self._sentinel_clients():
            try:
                return self._reported_port(client)
            except redis.RedisError:
                continue
        raise redis.ConnectionError(f"no Sentinel of {self!r} answered")

    @property
    def master(self) -> RedisProcess:
        """The server that is the master now."""
        return self._server_on(self.master_port)

    @property
    def replicas(self) -> list[RedisProcess]:
        """The servers that are not the master now."""
        port = self.master_port
        return [server for server in self.servers if server.port != port]

    def master_client(self, **kwargs: Any) -> redis.Redis:
        """A plain client of the master of now (it does not follow a failover)."""
        return self.master.client(**kwargs)

    # -- starting and stopping --------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start the master, then its replica, then the Sentinels; wait until they agree.

        If anything fails to start or agree within ``timeout`` seconds, every
        process started so far is stopped and the error raised.
        """
        try:
            master = self._add_server(())
            self._add_server(("--replicaof", HOST, str(master.port)))
            replica_ports = [server.port for server in self.servers[1:]]
            quorum = self.sentinel_count // 2 + 1
            self.sentinels = [
                SentinelProcess(
                    self.master_name, master.port, quorum=quorum, replica_ports=replica_ports, binary=self.binary
                )
                for _ in range(self.sentinel_count)
            ]
            for sentinel in self.sentinels:
                sentinel.introduce(self.sentinels)
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_settled(master.port, timeout)
            self._wait_watching(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every process (the Sentinels first) and delete their directories."""
        for process in [*self.sentinels, *self.servers]:
            process.stop()  # closes the clients made of it
        self._clients, self._server_clients = [], {}

    # -- failover -------------------------------------------------------------------------

    def failover(self, timeout: float = 20.0) -> float:
        """Run ``SENTINEL FAILOVER`` and wait until the replica has taken over; returns the seconds it took.

        It first waits, within the same ``timeout``, until every Sentinel has
        a replica it would promote (after a failover, that takes a while).
        Done means that every Sentinel reports the new master and that its
        ``ROLE`` is ``master``.  The old master is still a master then, with
        its clients connected, until the Sentinels turn it into a replica of
        the new one (ten seconds later; see :meth:`wait_settled`).
        """
        started = time.monotonic()
        self._wait_watching(timeout)
        old = self.master_port
        self._sentinel_clients()[0].sentinel_failover(self.master_name)
        wait_until(
            lambda: self._switched_from(old),
            max(0.0, started + timeout - time.monotonic()),
            interval=0.01,
            message=lambda: f"the Sentinels to switch {self.master_name!r} away from port {old}\n{self.logs()}",
        )
        return time.monotonic() - started

    def wait_settled(self, master_port: int | None = None, timeout: float = 30.0) -> None:
        """Wait until every Sentinel reports the master, and every other server replicates it.

        ``master_port`` is the master expected (by default the one the first
        Sentinel reports).  A replica counts once it has acknowledged every
        write: before its first acknowledgement the master holds its stream
        back, and a failover then would lose what it holds.  After
        :meth:`failover` this is the moment the old master has become a
        replica of the new one: its clients disconnected, its data replaced
        by the new master's.
        """
        port = self.master_port if master_port is None else master_port
        wait_until(
            lambda: self._settled(port),
            timeout,
            interval=0.02,
            message=lambda: f"the Sentinels to agree on the master on port {port}\n{self.logs()}",
        )

    def logs(self, lines: int = 15) -> str:
        """The tail of every process's log, each under its name."""
        return log_tails([p.process for p in [*self.servers, *self.sentinels] if p.process is not None], lines)

    # -- internals ------------------------------------------------------------------------

    def _add_server(self, args: Sequence[str]) -> RedisProcess:
        server = self.server_class((*self.server_args, *args), binary=self.binary)
        self.servers.append(server)
        return server.start()

    def _wait_watching(self, timeout: float) -> None:
        wait_until(
            self._watching,
            timeout,
            interval=0.02,
            message=lambda: f"the Sentinels to know each other and a replica to promote\n{self.logs()}",
        )

    def _server_on(self, port: int) -> RedisProcess:
        for server in self.servers:
            if server.port == port:
                return server
        raise LookupError(f"no server of {self!r} listens on port {port}")

    def _sentinel_clients(self) -> list[redis.Redis]:
        if len(self._clients) != len(self.sentinels):
            self._clients = [sentinel.client(decode_responses=True, **_FAIL_FAST) for sentinel in self.sentinels]
        return self._clients

    def _known_master_port(self) -> int | str:
        try:
            return self.master_port
        except redis.RedisError:
            return "?"

    def _switched_from(self, old: int) -> bool:
        try:
            ports = {self._reported_port(client) for client in self._sentinel_clients()}
            if len(ports) != 1 or old in ports:
                return False
            return bool(self._role(self._server_on(ports.pop()))[0] == "master")
        except (redis.RedisError, LookupError):
            return False

    def _settled(self, port: int) -> bool:
        """Whether the Sentinels report ``port`` and every other server replicates it, streaming."""
        try:
            if {self._reported_port(client) for client in self._sentinel_clients()} != {port}:
                return False
            master = self._server_on(port)
            others = [server for server in self.servers if server is not master]
            following = all(self._role(server)[:4] == ["slave", HOST, port, "connected"] for server in others)
            return following and self._caught_up(master, len(others))
        except (redis.RedisError, LookupError):
            return False

    def _watching(self) -> bool:
        """Whether every Sentinel knows its peers and a replica it could promote now."""
        others = len(self.sentinels) - 1
        try:
            for client in self._sentinel_clients():
                master = cast(dict[str, Any], client.sentinel_master(self.master_name))
                if master["flags"] != "master" or master["num-other-sentinels"] < others:
                    return False
                port = int(master["port"])
                if not any(_promotable(replica, port) for replica in client.sentinel_slaves(self.master_name)):
                    return False
            return True
        except (redis.RedisError, KeyError):
            return False

    def _reported_port(self, client: redis.Redis) -> int:
        address = cast(tuple[str, int], client.sentinel_get_master_addr_by_name(self.master_name))
        return int(address[1])

    def _caught_up(self, master: RedisProcess, replicas: int) -> bool:
        """Whether ``replicas`` replicas have acknowledged everything the master wrote so far.

        A replica may be listed ``online`` while the master still holds its
        stream back, until the replica's first acknowledgement: a replicated
        ``PUBLISH`` and ``WAIT`` tell the two apart, without writing a key.
        """
        client = self._client_of(master)
        client.publish(PROBE_CHANNEL, "")
        return bool(client.wait(replicas, PROBE_WAIT_MS) >= replicas)

    def _role(self, server: RedisProcess) -> list[Any]:
        return list(self._client_of(server).execute_command("ROLE"))  # type: ignore[no-untyped-call]

    def _client_of(self, server: RedisProcess) -> redis.Redis:
        if server.port not in self._server_clients:
            self._server_clients[server.port] = server.client(decode_responses=True, **_FAIL_FAST)
        return self._server_clients[server.port]


def _promotable(replica: dict[str, Any], master_port: int) -> bool:
    """Whether a Sentinel would promote this replica: in sync with ``master_port`` when it last looked, lately."""
    return (
        replica.get("flags") == "slave"
        and replica.get("master-link-status") == "ok"
        and int(replica.get("master-port", 0)) == master_port
        and int(replica.get("info-refresh", INFO_VALIDITY_MS)) < INFO_VALIDITY_MS
    )
