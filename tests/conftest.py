"""Shared fixtures: real redis-server processes on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from redis_servers import ClusterFactory, RedisCluster, RedisServer

# celery.contrib.pytest provides the in-process celery_app/celery_worker
# fixtures.  pytest-celery 1.x defines Docker-backed fixtures with the same
# names (pytest-celery issue 442), so its plugin is disabled in tox.ini with
# "-p no:celery" and this one is loaded explicitly.
pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server without persistence."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_nodes() -> Iterator[ClusterFactory]:
    """Factory starting groups of independent redis-server nodes.

    ``redis_nodes(n, extra_args=())`` returns a started :class:`RedisCluster`;
    every group made by the factory is closed when the test ends.
    """
    clusters: list[RedisCluster] = []

    def start(n: int, extra_args: Sequence[str] = ()) -> RedisCluster:
        cluster = RedisCluster(extra_args)
        clusters.append(cluster)
        return cluster.start(n)

    yield start
    for cluster in clusters:
        cluster.close()


@pytest.fixture
def redis_node1(redis_nodes: ClusterFactory) -> RedisCluster:
    """A single-node group."""
    return redis_nodes(1)


@pytest.fixture
def redis_nodes3(redis_nodes: ClusterFactory) -> RedisCluster:
    """Three independent nodes, the smallest quorum that tolerates a failure."""
    return redis_nodes(3)


@pytest.fixture
def redis_nodes5(redis_nodes: ClusterFactory) -> RedisCluster:
    """Five independent nodes."""
    return redis_nodes(5)
