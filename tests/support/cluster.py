"""Redis Cluster for the suite: the package's topology on the suite's servers.

* :class:`ClusterTopology`: :class:`celery_dlock.testing.cluster_process.ClusterTopology`
  (three masters and a replica of each, every one a real process on a free
  loopback port, joined by ``redis-cli --cluster create``) whose nodes are
  :class:`~support.redis_servers.RedisServer` nodes, so a test can also
  pause, kill or restart them, and which :meth:`~ClusterTopology.heal` puts
  back together between tests that share it.

Not to be confused with :class:`support.redis_servers.RedisCluster`, a group
of independent masters that know nothing of each other.
"""

from __future__ import annotations

from typing import Any, cast

from celery_dlock.testing.cluster_process import ClusterTopology as BaseTopology
from celery_dlock.testing.redis_process import RedisProcess

from .redis_servers import RedisServer

__all__ = ["ClusterTopology"]


class ClusterTopology(BaseTopology):
    """The package's Redis Cluster topology on :class:`RedisServer` nodes.

    A node killed with :meth:`RedisServer.kill` comes back into the cluster
    through :meth:`restart` (as a replica); :meth:`RedisServer.restart` with
    ``wipe=True`` would delete its ``nodes.conf`` and with it its membership.
    """

    def __init__(self, **options: Any) -> None:
        options.setdefault("server_class", RedisServer)
        super().__init__(**options)

    @property
    def nodes(self) -> list[RedisServer]:
        """Every node, as the :class:`RedisServer` it is."""
        return [cast(RedisServer, server) for server in self.servers]

    def server(self, process: RedisProcess) -> RedisServer:
        """``process`` (a master or replica as the topology returns it) as the :class:`RedisServer` it is."""
        if not isinstance(process, RedisServer):
            raise TypeError(f"{process!r} is not a RedisServer")
        return process

    def heal(self, timeout: float = 30.0) -> None:
        """Resume paused nodes, restart killed ones, wait until the cluster settles, and delete every key."""
        for node in self.nodes:
            if node.process is not None and node.process.paused:
                node.resume()
        for node in self.nodes:
            if not node.running:
                self.restart(node, timeout)
        self.wait_settled(timeout)
        self.flushall()
