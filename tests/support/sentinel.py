"""Redis Sentinel for the suite: the package's topology on the suite's servers, and worker stacks on it.

* :class:`SentinelTopology`: :class:`celery_dlock.testing.sentinel_process.SentinelTopology`
  (one master, one replica, three Sentinels, each a real process on a free
  loopback port) whose master and replica are :class:`~support.redis_servers.RedisServer`
  nodes, so a test can also pause, kill or restart them.
* :func:`sentinel_conf`: Celery settings that put the broker and the results
  behind the Sentinels, named as Celery names them.
* :class:`SentinelStack`: a :class:`~support.worker_stack.Stack` whose broker,
  results and locks go through the Sentinels, running ``tests/celery/sentinel_app.py``
  in its workers.
"""

from __future__ import annotations

from typing import Any, Final

import redis
from celery import Celery

from celery_dlock.testing.sentinel_process import DEFAULT_MASTER_NAME
from celery_dlock.testing.sentinel_process import SentinelTopology as BaseTopology

from .redis_servers import RedisServer
from .worker_stack import Stack

__all__ = [
    "ENV_LOCK_SOURCE",
    "ENV_SENTINEL_MASTER",
    "SentinelStack",
    "SentinelTopology",
    "sentinel_conf",
]

#: The master name, for ``sentinel_app``.
ENV_SENTINEL_MASTER: Final = "DLOCK_TEST_SENTINEL_MASTER"
#: Where ``sentinel_app`` takes its lock address from: ``broker`` (derived,
#: ``dlock_redis_url`` unset) or ``explicit`` (``dlock_redis_url`` with
#: ``dlock_sentinel_master``).
ENV_LOCK_SOURCE: Final = "DLOCK_TEST_LOCK_SOURCE"


class SentinelTopology(BaseTopology):
    """The package's Sentinel topology on :class:`RedisServer` nodes.

    :attr:`port` is the master's, so that a :class:`~support.worker_stack.Stack`
    can take the topology for its broker (its recorder then lives in
    database 1 of the master: right for tests that do not fail over), and
    :attr:`urls` lists it as one lock node, for helpers that take a group of
    nodes (the fault harness's holders).
    """

    def __init__(self, master_name: str = DEFAULT_MASTER_NAME, **options: Any) -> None:
        options.setdefault("server_class", RedisServer)
        super().__init__(master_name, **options)

    @property
    def port(self) -> int:
        """The master's port, as the Sentinels report it."""
        return self.master_port

    @property
    def urls(self) -> list[str]:
        """The lock nodes: one, the Sentinel-managed master."""
        return [self.url]


def sentinel_conf(url: str, master_name: str) -> dict[str, Any]:
    """Celery settings with the broker and the results behind the Sentinels of ``url``."""
    options = {"master_name": master_name}
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": dict(options),
        "result_backend_transport_options": dict(options),
        "broker_connection_retry_on_startup": True,
    }


class SentinelStack(Stack):
    """A :class:`Stack` whose ``broker`` is a :class:`SentinelTopology`: broker, results and locks through it.

    Its workers run ``sentinel_app``, told the master name and where to take
    the lock address from (``env``, see :data:`ENV_LOCK_SOURCE`).  Its client
    app sets no ``dlock_*`` setting: its lock address is derived from its
    broker, as ``celery dlock`` on such an app derives it.
    """

    broker: SentinelTopology  # type: ignore[assignment]

    @classmethod
    def on(cls, topology: SentinelTopology, lock_source: str) -> SentinelStack:
        """A stack on ``topology`` whose workers take the lock address from ``lock_source``; close it."""
        env = {ENV_SENTINEL_MASTER: topology.master_name, ENV_LOCK_SOURCE: lock_source}
        return cls(topology, [topology.url], env)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        self.app = Celery("dlock-sentinel-client", set_as_current=False)
        self.app.conf.update(sentinel_conf(self.broker.url, self.broker.master_name))
        self.recorder = redis.Redis.from_url(self.recorder_url)
        self.locks = self.broker.master_client()

    def worker(self, **options: Any) -> Any:
        """Start a ``sentinel_app`` worker on this stack; it is stopped when the stack closes."""
        options.setdefault("app_module", "sentinel_app")
        return super().worker(**options)
