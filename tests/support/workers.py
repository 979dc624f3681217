"""``celery worker`` subprocesses running one of the suite's test apps.

A :class:`CeleryWorker` is the package's :class:`~celery_dlock.testing.worker_process.WorkerProcess`
(``python -m celery -A <app> worker -P prefork`` in a process group of its
own) running a test app: ``worker_app`` of ``tests/celery`` by default,
``beat_app`` or ``fault_app`` when asked.  The broker, lock and recorder URLs
reach the app through the environment variables of
:func:`support.apps.app_environment`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from celery_dlock.testing.worker_process import WorkerProcess

from .apps import app_environment
from .paths import TESTS_DIR, import_path

__all__ = ["CeleryWorker"]

#: Where ``worker_app`` lives.
CELERY_TESTS_DIR = TESTS_DIR / "celery"


class CeleryWorker(WorkerProcess):
    """One ``celery worker`` subprocess running a test app.

    Arguments:
        broker_url: The broker and result backend (``redis://``).
        lock_urls: The lock nodes, for ``dlock_redis_url``.
        recorder_url: Where the test tasks record what they did.
        app_module: What ``-A`` imports, from ``app_dir``.
        app_dir: The directory of ``app_module``; ``tests/celery`` by default.
        env: More environment variables (the apps read a few, see there).
        options: The rest of :class:`~celery_dlock.testing.worker_process.WorkerProcess`'s
            arguments (``concurrency``, ``queues``, ``extra_args``, ``name`` ...).
    """

    def __init__(
        self,
        *,
        broker_url: str,
        lock_urls: Sequence[str],
        recorder_url: str,
        app_module: str = "worker_app",
        app_dir: Path = CELERY_TESTS_DIR,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.broker_url = broker_url
        self.lock_urls = list(lock_urls)
        self.recorder_url = recorder_url
        environment = app_environment(broker_url=broker_url, lock_urls=lock_urls, recorder_url=recorder_url)
        super().__init__(app_module, env={**environment, **(env or {})}, pythonpath=import_path(app_dir), **options)
