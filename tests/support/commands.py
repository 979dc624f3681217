"""``celery -A <test app> ...`` commands run as processes of their own, on a stack's servers.

:func:`app_command` gives the command line and environment that run a
``celery`` subcommand on a test app, the way :class:`support.workers.CeleryWorker`
runs a worker: same import path, same variables of :func:`support.apps.app_environment`.
:class:`DLockExporter` is ``celery dlock metrics`` as a
:class:`~celery_dlock.testing.process.ManagedProcess`, started once it says it
serves, and read with ``prometheus_client``'s text parser.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from celery_dlock.testing.process import ManagedProcess, python_environment, remove_scratch_dir, scratch_dir
from celery_dlock.testing.redis_process import HOST, free_port

from .apps import app_environment
from .paths import import_path
from .workers import CELERY_TESTS_DIR

if TYPE_CHECKING:
    from typing_extensions import Self

    from .worker_stack import Stack

__all__ = ["DLockExporter", "Samples", "app_command"]

#: ``(metric sample name, sorted label items)`` to the sample's value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def app_command(
    stack: Stack, *args: str, app_module: str = "worker_app", app_dir: Path = CELERY_TESTS_DIR
) -> tuple[list[str], dict[str, str]]:
    """The command line of ``celery -A app_module ARGS`` and the environment it runs in on ``stack``."""
    variables = app_environment(broker_url=stack.broker.url, lock_urls=stack.lock_urls, recorder_url=stack.recorder_url)
    env = python_environment(import_path(app_dir), {**variables, **stack.env})
    return [sys.executable, "-m", "celery", "-A", app_module, *args], env


class DLockExporter(ManagedProcess):
    """``celery -A worker_app dlock metrics`` on ``stack``, on a free loopback port."""

    def __init__(self, stack: Stack, *, startup_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.dir = scratch_dir("dlock-exporter-")
        command, env = app_command(stack, "dlock", "metrics", "--port", str(self.port), "--address", HOST)
        super().__init__(command, log_path=self.dir / "exporter.log", cwd=self.dir, env=env, name="dlock-metrics")

    def start(self) -> Self:
        """Start the exporter and wait until it serves; killed if it does not."""
        super().start()
        try:
            self.wait_for_log("serving celery_dlock metrics on", self.startup_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def text(self) -> str:
        """The exposition text at ``/metrics``."""
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=5) as response:
            body: bytes = response.read()
        return body.decode()

    def samples(self) -> Samples:
        """Every sample of one scrape, parsed by ``prometheus_client``."""
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.text())
            for sample in family.samples
        }

    def close(self) -> None:
        """Stop the exporter and delete its directory."""
        self.stop()
        remove_scratch_dir(self.dir)
