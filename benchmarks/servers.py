"""Throwaway redis-server nodes for the benchmarks, from ``celery_dlock.testing``.

The nodes are :class:`celery_dlock.testing.redis_process.RedisProcess`, the
package's own throwaway server (the one the tests and the pytest plugin run
too), a Sentinel-managed master is a
:class:`celery_dlock.testing.sentinel_process.SentinelTopology`, and a Redis
Cluster a :class:`celery_dlock.testing.cluster_process.ClusterTopology`.  They listen
on free loopback ports, never on the system server's 6379.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from celery_dlock.testing.cluster_process import ClusterTopology
from celery_dlock.testing.redis_process import HOST, RedisProcess, find_redis_server
from celery_dlock.testing.sentinel_process import SentinelTopology

__all__ = [
    "HOST",
    "ClusterTopology",
    "RedisProcess",
    "SentinelTopology",
    "nodes",
    "pids",
    "redis_server_binary",
    "redis_server_version",
]

#: The port a system redis-server usually holds; the benchmarks never use it.
SYSTEM_PORT = 6379


@contextmanager
def nodes(count: int) -> Iterator[list[RedisProcess]]:
    """Start ``count`` independent redis-servers; all are killed on exit."""
    with ExitStack() as stack:
        cluster = [stack.enter_context(RedisProcess()) for _ in range(count)]
        if any(server.port == SYSTEM_PORT for server in cluster):
            raise RuntimeError(f"a benchmark node landed on port {SYSTEM_PORT}; run again")
        yield cluster


def pids(cluster: list[RedisProcess]) -> list[int]:
    """The process ids of the running nodes of ``cluster``."""
    return [server.proc.pid for server in cluster if server.proc is not None]


def redis_server_binary() -> str:
    """The redis-server executable the nodes run (see ``find_redis_server``)."""
    return find_redis_server()


def redis_server_version() -> str:
    """The version line of :func:`redis_server_binary`, such as ``v=7.2.4``."""
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return fields.get("v", out.strip())
