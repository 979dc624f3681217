# mypy: disable-error-code="untyped-decorator"
"""The Celery app of ``test_scopes.py`` and ``test_migration.py``: every lock scope, and the anchors.

``celery -A scopes_app worker`` builds it from the environment of
:func:`support.apps.app_environment`; a test builds its own copy with
:func:`build`, so that its publishes go through the same task definitions
and take the same publish-time locks.  The celery-once and celery-singleton
tasks keep their locks on the same lock node, for the migration tests.

With ``DLOCK_TEST_AMQP_URL`` set, the broker is that RabbitMQ instead (the
results stay on the test's redis-server), and ``DLOCK_TEST_QUEUE`` names the
default queue, one of the run's own, since RabbitMQ is shared between runs.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from celery import Celery, Task
from celery_once import QueueOnce
from celery_singleton import Singleton
from support.apps import AppUrls, app_urls
from support.recording import event, section, wait_for_flag

from celery_dlock import single_flight

#: The short lease of the lost-message and kill tests.
SHORT = 2.0

#: A RabbitMQ broker to use instead of the redis-server of ``urls.broker``.
ENV_AMQP_URL = "DLOCK_TEST_AMQP_URL"
#: The default queue, if not ``celery``.
ENV_QUEUE = "DLOCK_TEST_QUEUE"


def build(urls: AppUrls, amqp: str | None = None, queue: str | None = None) -> SimpleNamespace:
    """The app and its tasks, on these servers (the broker on RabbitMQ at ``amqp``, if given)."""
    app = Celery("scopes_app", broker=amqp or urls.broker, backend=urls.broker, set_as_current=False)
    if queue:
        app.conf.task_default_queue = queue
    app.conf.update(
        dlock_redis_url=urls.locks,
        dlock_requeue_delay=0.05,
        dlock_requeue_max_delay=0.3,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_redirect_stdouts=False,
        result_expires=600,
        ONCE={"backend": "celery_once.backends.Redis", "settings": {"url": urls.locks[0], "default_timeout": 60}},
        singleton_backend_url=urls.locks[0],
    )

    def body(task: Task, key: str, n: int, flag: str | None) -> dict[str, Any]:
        with section(task, key):
            wait_for_flag(flag)
        return {"id": task.request.id, "n": n, "retries": task.request.retries}

    def scoped(name: str, **options: Any) -> Any:
        if options["scope"] != "queue":
            options.setdefault("max_requeues", 1000)

        @app.task(name=f"sc.{name}", bind=True, shared=False)
        @single_flight(key="{key}", ttl=30, **options)
        def run(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
            return body(self, key, n, flag)

        return run

    tasks = SimpleNamespace(app=app)
    tasks.run = scoped("run", scope="run")
    tasks.queue = scoped("queue", scope="queue")
    tasks.queue_run = scoped("queue_run", scope="queue+run", on_busy="requeue")
    tasks.life = scoped("life", scope="life")
    tasks.life_raise = scoped("life_raise", scope="life", on_duplicate="raise")
    tasks.life_drop = scoped("life_drop", scope="life", on_duplicate="drop")
    tasks.queue_raise = scoped("queue_raise", scope="queue", on_duplicate="raise")
    tasks.queue_drop = scoped("queue_drop", scope="queue", on_duplicate="drop")
    tasks.replace = scoped("replace", scope="queue+run", on_duplicate="replace")
    tasks.lost = scoped("lost", scope="life", queue_ttl=SHORT)

    @app.task(name="sc.life_short_ttl", bind=True, shared=False)
    @single_flight(key="{key}", ttl=SHORT, scope="life")
    def life_short_ttl(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        return body(self, key, n, flag)

    @app.task(name="sc.life_retry", bind=True, shared=False, max_retries=2)
    @single_flight(key="{key}", ttl=30, scope="life", on_duplicate="raise")
    def life_retry(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        result = body(self, key, n, flag if self.request.retries == 0 else None)
        if self.request.retries == 0:
            raise self.retry(countdown=1.0)
        return result

    @app.task(name="sc.life_again", bind=True, shared=False)
    @single_flight(key="{key}", ttl=30, scope="life", on_duplicate="raise", max_requeues=1000)
    def life_again(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        """Publish the next run of its own key from inside its run (once), then hold until ``flag``."""
        with section(self, key):
            if n == 0:
                event(self, "published", child=self.apply_async((key, 1, None)).id)
            wait_for_flag(flag)
        return {"id": self.request.id, "n": n}

    # -- the anchors, and their equivalents -------------------------------------------

    @app.task(name="sc.once", bind=True, base=QueueOnce, shared=False, once={"graceful": False})
    def once(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        return body(self, key, n, flag)

    @app.task(name="sc.once_graceful", bind=True, base=QueueOnce, shared=False, once={"graceful": True})
    def once_graceful(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        return body(self, key, n, flag)

    @app.task(name="sc.once_unlock_early", bind=True, base=QueueOnce, shared=False, once={"unlock_before_run": True})
    def once_unlock_early(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        return body(self, key, n, flag)

    @app.task(name="sc.singleton", bind=True, base=Singleton, shared=False, unique_on=["key"], lock_expiry=60)
    def singleton(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        return body(self, key, n, flag)

    @app.task(name="sc.singleton_raise", bind=True, base=Singleton, shared=False, raise_on_duplicate=True)
    def singleton_raise(self: Task, key: str, n: int = 0, flag: str | None = None) -> dict[str, Any]:
        return body(self, key, n, flag)

    tasks.once, tasks.once_graceful, tasks.once_unlock_early = once, once_graceful, once_unlock_early
    tasks.singleton, tasks.singleton_raise = singleton, singleton_raise
    tasks.life_short_ttl, tasks.life_retry, tasks.life_again = life_short_ttl, life_retry, life_again
    # celery-once's drop-in: scope="life" (or "queue" for unlock_before_run), key from the arguments.
    tasks.like_once = scoped("like_once", scope="life", on_duplicate="raise")
    tasks.like_once_graceful = scoped("like_once_graceful", scope="life", on_duplicate="drop")
    tasks.like_once_unlock_early = scoped("like_once_unlock_early", scope="queue", on_duplicate="raise")
    # celery-singleton's: scope="life"; unique_on=["key"] is key="{key}", lock_expiry the queue_ttl.
    tasks.like_singleton = scoped("like_singleton", scope="life", queue_ttl=60)
    tasks.like_singleton_raise = scoped("like_singleton_raise", scope="life", on_duplicate="raise")
    return tasks


app = build(app_urls(), os.environ.get(ENV_AMQP_URL), os.environ.get(ENV_QUEUE)).app
