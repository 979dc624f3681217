"""Fixtures every layer's tests share: real redis-server processes on loopback ports.

``tests/`` is on ``sys.path`` (pytest's default "prepend" import mode puts
this conftest's directory there), so the helpers import as :mod:`support`;
see ``tests/support/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from support.cluster import ClusterTopology
from support.redis_servers import ClusterFactory, RedisCluster, RedisServer
from support.results import collect_results
from support.sentinel import SentinelTopology

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
        cluster.stop()


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


# -- Celery: in-process app and worker (celery.contrib.pytest) ------------------


@pytest.fixture
def lock_server() -> Iterator[RedisServer]:
    """A redis-server for the locks alone, apart from the broker's."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def celery_config(redis_server: RedisServer, lock_server: RedisServer) -> Iterator[dict[str, object]]:
    """Broker and results on one fresh server, locks on another."""
    yield {
        "broker_url": redis_server.url,
        "result_backend": redis_server.url,
        "dlock_redis_url": lock_server.url,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }
    collect_results()


@pytest.fixture
def celery_worker_pool() -> str:
    """Threads, so that tasks of one in-process worker really run at once."""
    return "threads"


@pytest.fixture
def celery_worker_parameters() -> dict[str, object]:
    """Four threads; no ping task, since the test app does not register it."""
    return {"concurrency": 4, "perform_ping_check": False}


# -- Redis Sentinel: a master, its replica and three Sentinels ------------------


@pytest.fixture
def sentinel_topology() -> Iterator[SentinelTopology]:
    """A fresh Sentinel-managed master with one replica and three Sentinels (quorum 2), all on loopback.

    ``sentinel_topology.url`` and ``.master_name`` are what ``Redlock`` and
    Celery take; ``.failover()`` runs ``SENTINEL FAILOVER`` (see
    :mod:`support.sentinel`).  About a tenth of a second to start.
    """
    with SentinelTopology() as topology:
        yield topology


# -- Redis Cluster: three masters and a replica of each -------------------------


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[ClusterTopology]:
    """A Redis Cluster of three masters and a replica of each, all on loopback, shared by a test module.

    ``redis_cluster.url`` (``redis+cluster://...``), ``.client()`` and
    ``.master_for_key(key)`` say where things are; ``.failover(slot)`` and
    ``.kill_master(slot)`` switch a slot to its replica (see
    :mod:`support.cluster`).  About two seconds to start, so one per module:
    a test that leaves it broken should ask for ``clean_redis_cluster``.
    """
    with ClusterTopology() as topology:
        yield topology


@pytest.fixture
def clean_redis_cluster(redis_cluster: ClusterTopology) -> ClusterTopology:
    """The module's ``redis_cluster``, healed (killed nodes restarted, paused ones resumed) and emptied."""
    redis_cluster.heal()
    return redis_cluster
