"""The Celery app that the worker benchmarks run, one variant per worker.

``celery -A benchmarks.celery_app worker`` builds the app of the variant
named by ``DLOCK_BENCH_VARIANT``, from the URLs that
:mod:`benchmarks.workers` puts in the environment; the benchmark process
calls :func:`build` with the same arguments to publish the messages, so
that libraries that lock at publish time (celery-once, celery-singleton,
celery-heimdall) do so.

Every variant defines one task, :data:`TASK_NAME`, with the same body: it
reads the monotonic clock (one clock for every process on the machine),
sleeps ``hold`` seconds if asked, reads it again, and pushes
``"<start_ns> <end_ns> <requeues>"`` to the recorder's :data:`RUNS` list.
Only what wraps the body differs between variants.  The reclaim scenario's
bodies hold one key until their worker is killed, and never record.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis
from celery import Celery, Task
from kombu.entity import Queue

__all__ = [
    "ENV_URLS",
    "ENV_VARIANT",
    "RECLAIM_KEY",
    "RECLAIM_TTL",
    "RUNS",
    "TASK_NAME",
    "VARIANTS",
    "Urls",
    "app",
    "build",
]

#: The variant a worker runs.
ENV_VARIANT: Final = "DLOCK_BENCH_VARIANT"
#: The broker, the lock server and the recorder, comma-separated.
ENV_URLS: Final = "DLOCK_BENCH_URLS"

#: The one task every variant defines.
TASK_NAME: Final = "bench.work"
#: The recorder list each run is pushed to.
RUNS: Final = "runs"
#: Consumed from the start: warm-up messages go here.
WARM_QUEUE: Final = "bench-warm"
#: Filled while the worker is warm but not consuming it; then consumed.
WORK_QUEUE: Final = "bench-work"

#: The key of every message in the one-key variants.
CONTENDED_KEY: Final = "bench:contended"

#: The key of the one run of the reclaim scenario, whose worker is killed.
RECLAIM_KEY: Final = "bench:reclaimed"
#: Its lease, in seconds: how long the lock outlives a killed worker without reclaiming.
RECLAIM_TTL: Final = 15.0

#: Lock server databases of each library, so that none sees another's keys.
_DB: Final = {"ours": 0, "celery-once": 1, "celery-singleton": 2, "celery-heimdall": 3, "floor": 4}

#: Requeue countdowns for the contention variants: short, as a drain of
#: ~10 ms bodies needs (the defaults, 1 s doubling to 60 s, would idle).
CONTENTION_SETTINGS: Final[Mapping[str, Any]] = {
    "dlock_requeue_delay": 0.02,
    "dlock_requeue_max_delay": 0.2,
    "dlock_max_requeues": 1000,
    "dlock_wait_timeout": 60.0,
}

# A worker's default log level (WARNING) logs nothing per task; the workers
# run at INFO so that their "ready" line shows, but per-task lines would add
# the same cost to every variant and hide the differences.
for _name in ("celery.app.trace", "celery.worker.strategy"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Urls:
    """The three redis-servers of a worker benchmark."""

    broker: str
    locks: str
    recorder: str

    def encode(self) -> str:
        """As :data:`ENV_URLS` carries them."""
        return f"{self.broker},{self.locks},{self.recorder}"

    @classmethod
    def decode(cls, text: str) -> Urls:
        """The inverse of :meth:`encode`."""
        broker, locks, recorder = text.split(",")
        return cls(broker, locks, recorder)

    def locks_db(self, library: str) -> str:
        """The lock server URL with the database of ``library``."""
        return f"{self.locks.rsplit('/', 1)[0]}/{_DB[library]}"


_recorders: dict[tuple[int, str], redis.Redis] = {}


def recorder(url: str) -> redis.Redis:
    """The client of the recorder for this process (made anew after a fork)."""
    key = (os.getpid(), url)
    client = _recorders.get(key)
    if client is None:
        client = _recorders[key] = redis.Redis.from_url(url)
    return client


def _body(recorder_url: str) -> Callable[..., None]:
    """The task function every variant wraps: time the body, then record it."""

    def work(self: Task, n: int, hold: float = 0.0) -> None:
        started = time.monotonic_ns()
        if hold:
            time.sleep(hold)
        ended = time.monotonic_ns()
        requeues = (self.request.headers or {}).get("dlock_requeues", 0)
        recorder(recorder_url).rpush(RUNS, f"{started} {ended} {requeues}")

    work.__qualname__ = work.__name__ = "work"
    return work


# -- the variants -----------------------------------------------------------------


def _plain(app: Celery, urls: Urls) -> object:
    return app.task(name=TASK_NAME, bind=True, shared=False)(_body(urls.recorder))


def _ours(
    on_busy: str | None, key: str | None, ttl: float | None = None, **settings: object
) -> Callable[[Celery, Urls], object]:
    """``@single_flight`` under ``@app.task``: by argument hash, or one key.

    ``on_busy`` brings the :data:`CONTENTION_SETTINGS`; ``ttl`` is the task's
    lease (by default ``dlock_default_ttl``); ``settings`` are more ``dlock_*``.
    """

    def define(app: Celery, urls: Urls) -> object:
        from celery_dlock import single_flight

        app.conf.dlock_redis_url = urls.locks_db("ours")
        app.conf.update({f"dlock_{name}": value for name, value in settings.items()})
        if on_busy is not None:
            app.conf.update(CONTENTION_SETTINGS)
        # None takes the app's setting, as if the option were not given.
        guarded = single_flight(key=key, ttl=ttl, on_busy=on_busy)(_body(urls.recorder))
        return app.task(name=TASK_NAME, bind=True, shared=False)(guarded)

    return define


#: Delete a key only if it still holds the caller's token.
_COMPARE_AND_DELETE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _floor(app: Celery, urls: Urls) -> object:
    """A plain task whose body takes the least correct lock itself: ``SET NX PX``, then compare-and-delete."""
    body = _body(urls.recorder)
    clients: dict[int, tuple[redis.Redis, str]] = {}

    def locked(self: Task, n: int, hold: float = 0.0) -> None:
        found = clients.get(os.getpid())
        if found is None:
            client = redis.Redis.from_url(urls.locks_db("floor"))
            found = clients[os.getpid()] = (client, client.script_load(_COMPARE_AND_DELETE))
        client, sha = found
        name, token = f"bench:floor:{n}", os.urandom(16).hex()
        if not client.set(name, token, nx=True, px=30_000):
            raise RuntimeError(f"floor: {name} was held")
        try:
            body(self, n, hold)
        finally:
            client.evalsha(sha, 1, name, token)

    locked.__qualname__ = locked.__name__ = "work"
    return app.task(name=TASK_NAME, bind=True, shared=False)(locked)


def _celery_once(app: Celery, urls: Urls) -> object:
    from celery_once import QueueOnce
    from celery_once.backends import redis as once_redis

    # celery-once keeps one client per process in a module global, made
    # from the first app's URL: forget it, the servers may be new ones.
    once_redis.redis = None
    app.conf.ONCE = {
        "backend": "celery_once.backends.Redis",
        "settings": {"url": urls.locks_db("celery-once"), "default_timeout": 3600},
    }
    return app.task(name=TASK_NAME, bind=True, shared=False, base=QueueOnce)(_body(urls.recorder))


def _celery_singleton(app: Celery, urls: Urls) -> object:
    from celery_singleton import Singleton

    app.conf.singleton_backend_url = urls.locks_db("celery-singleton")
    return app.task(name=TASK_NAME, bind=True, shared=False, base=Singleton)(_body(urls.recorder))


def _celery_heimdall(app: Celery, urls: Urls) -> object:
    from celery_heimdall import HeimdallTask

    lock_url = urls.locks_db("celery-heimdall")

    class BenchHeimdallTask(HeimdallTask):  # type: ignore[misc]
        """celery-heimdall on the lock server, as its docs say to do it."""

        def setup_redis(self) -> redis.Redis:
            return redis.Redis.from_url(lock_url)

    # With its default (blocking for up to 1 s), each task's run-time check
    # polls for a second on the lock its own publish took, before seeing
    # that the holder is itself: 1 s per task.  Not blocking skips that wait.
    app.conf.heimdall_unique_lock_blocking = False
    return app.task(
        name=TASK_NAME,
        bind=True,
        shared=False,
        base=BenchHeimdallTask,
        heimdall={"unique": True},
    )(_body(urls.recorder))


#: Every variant, by name: how it defines the task on an app.
VARIANTS: Final[Mapping[str, Callable[[Celery, Urls], object]]] = {
    "plain": _plain,
    "floor": _floor,
    "ours": _ours(None, None),
    "ours-metrics": _ours(None, None, metrics=True),
    "ours-history": _ours(None, None, history=100),
    "celery-once": _celery_once,
    "celery-singleton": _celery_singleton,
    "celery-heimdall": _celery_heimdall,
    "ours-requeue": _ours("requeue", CONTENDED_KEY),
    "ours-wait": _ours("wait", CONTENDED_KEY),
    "ours-queue": _ours("queue", CONTENDED_KEY),
    "ours-ttl-only": _ours(None, RECLAIM_KEY, RECLAIM_TTL),
    "ours-reclaim": _ours(None, RECLAIM_KEY, RECLAIM_TTL, reclaim_offline=True),
}


def build(variant: str, urls: Urls, *, worker: bool = False) -> tuple[Celery, Task]:
    """An app running ``variant`` over ``urls``, and its :data:`TASK_NAME` task.

    ``worker`` says the app is the worker's own, to be the current app.
    """
    app = Celery("bench-worker" if worker else "bench", broker=urls.broker, set_as_current=worker)
    app.conf.update(
        task_ignore_result=True,
        task_queues=[Queue(WARM_QUEUE), Queue(WORK_QUEUE)],
        task_default_queue=WARM_QUEUE,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    VARIANTS[variant](app, urls)
    app.finalize()
    return app, app.tasks[TASK_NAME]


def _from_environment() -> Celery | None:
    variant = os.environ.get(ENV_VARIANT)
    if not variant:
        return None
    worker_app, _ = build(variant, Urls.decode(os.environ[ENV_URLS]), worker=True)
    return worker_app


#: The worker's app, when ``DLOCK_BENCH_VARIANT`` is set.
app = _from_environment()
