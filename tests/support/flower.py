"""A real ``celery flower`` subprocess, read through its HTTP API.

A :class:`Flower` is a :class:`~celery_dlock.testing.process.ManagedProcess`
running ``python -m celery --broker <url> flower`` on a free loopback port,
logging to a scratch directory of its own.  It counts as started once
``/healthcheck`` answers.  Flower 2 serves its API only with authentication
configured, or with ``FLOWER_UNAUTHENTICATED_API`` set, which is done here.
What it knows of a task comes from the task events it has consumed, so a
test sends them with ``celery worker -E``.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from celery_dlock.testing.process import ManagedProcess, python_environment, remove_scratch_dir, scratch_dir
from celery_dlock.testing.redis_process import HOST, free_port

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Flower"]


class Flower(ManagedProcess):
    """``celery flower`` on ``broker_url``, listening on ``127.0.0.1:<port>``."""

    def __init__(self, broker_url: str, *, startup_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.dir = scratch_dir("dlock-flower-")
        command = [
            sys.executable, "-m", "celery", "--broker", broker_url, "flower",
            f"--port={self.port}", f"--address={HOST}", "--persistent=False",
        ]  # fmt: skip
        super().__init__(
            command,
            log_path=self.dir / "flower.log",
            cwd=self.dir,
            env=python_environment((), {"FLOWER_UNAUTHENTICATED_API": "true"}),
            name="flower",
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Self:
        """Start Flower and wait until it answers; killed if it does not."""
        super().start()
        try:
            self.wait_for(self._healthy, self.startup_timeout, what="/healthcheck", interval=0.1)
        except BaseException:
            self.kill()
            raise
        return self

    def get(self, path: str) -> Any:
        """The JSON at ``path``, or ``None`` if Flower answers 404."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def task(self, task_id: str) -> dict[str, Any] | None:
        """What ``/api/task/info/<id>`` says of a task, or ``None`` before Flower has seen it."""
        info: dict[str, Any] | None = self.get(f"/api/task/info/{task_id}")
        return info

    def close(self) -> None:
        """Stop Flower and delete its directory."""
        self.stop()
        remove_scratch_dir(self.dir)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthcheck", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
