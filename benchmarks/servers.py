"""Throwaway redis-server nodes for the benchmarks, from the tests' helper.

The benchmarks reuse ``tests/redis_servers.py`` rather than a copy of it: the
tests directory is put on ``sys.path`` and the module imported as the tests
import it.  Nodes listen on free loopback ports, never on the system
server's 6379.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

from redis_servers import HOST, RedisCluster, RedisServer, find_redis_server  # noqa: E402

__all__ = [
    "HOST",
    "RedisCluster",
    "RedisServer",
    "nodes",
    "pids",
    "redis_server_binary",
    "redis_server_version",
]

#: The port a system redis-server usually holds; the benchmarks never use it.
SYSTEM_PORT = 6379


@contextmanager
def nodes(count: int) -> Iterator[RedisCluster]:
    """Start ``count`` independent redis-servers; all are killed on exit."""
    with RedisCluster() as cluster:
        cluster.start(count)
        if any(server.port == SYSTEM_PORT for server in cluster):
            raise RuntimeError(f"a benchmark node landed on port {SYSTEM_PORT}; run again")
        yield cluster


def pids(cluster: RedisCluster) -> list[int]:
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
