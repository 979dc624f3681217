"""Real ``celery worker`` subprocesses: started, waited for until ready, stopped warm or killed whole.

A :class:`WorkerProcess` runs ``python -m celery -A <app> worker`` as a
:class:`~celery_dlock.testing.process.ManagedProcess`, logging to a file in a
scratch directory of its own.  It counts as started once its log says
``<name>@<host> ready.`` and every pool process is there.  :meth:`~ManagedProcess.stop`
is a warm shutdown (``SIGTERM`` to the main process, which lets running tasks
finish); :meth:`~ManagedProcess.kill` takes the main process and its pool at
once, as ``kill -9`` of the whole worker would.

Celery is not imported here: the worker is another process.  The app module
must be importable there, from ``pythonpath`` or the worker's environment.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from .process import ManagedProcess, python_environment, remove_scratch_dir, scratch_dir

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ENV_KEEP_LOGS", "WorkerProcess"]

#: Set to keep the workers' logs (``/tmp/dlock-worker-*/worker.log``) after a run.
ENV_KEEP_LOGS: Final = "DLOCK_TEST_KEEP_LOGS"


class WorkerProcess(ManagedProcess):
    """One ``celery worker`` subprocess running the app ``app_module``.

    Arguments:
        app_module: What ``-A`` imports.
        concurrency: Pool processes (``-c``).
        pool: The pool (``-P``).
        queues: Queues to consume (``-Q``); by default Celery's ``celery``.
        extra_args: More ``celery worker`` arguments, such as ``-E`` or ``--time-limit``.
        env: More environment variables (the rest is this process's environment).
        pythonpath: Directories put first on the worker's ``PYTHONPATH``.
        name: The node name before the ``@``; unique by default.
        cwd: The working directory; by default the worker's own directory.
        startup_timeout: Seconds :meth:`start` waits for ``ready``.
        heartbeat: Send worker heartbeats this many seconds apart
            (``--heartbeat-interval``); by default none (``--without-heartbeat``).

    Attributes:
        dir: The worker's directory, holding its log; deleted by :meth:`close`
            or when the interpreter exits, unless ``DLOCK_TEST_KEEP_LOGS`` is set.
        hostname: The full node name (``name@host``) once the worker is ready.

    """

    def __init__(
        self,
        app_module: str,
        *,
        concurrency: int = 4,
        pool: str = "prefork",
        queues: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        pythonpath: Sequence[str | os.PathLike[str]] = (),
        name: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        heartbeat: float | None = None,
    ) -> None:
        self.app_module = app_module
        self.concurrency = concurrency
        self.pool = pool
        self.startup_timeout = startup_timeout
        self.hostname: str | None = None
        self.dir = scratch_dir("dlock-worker-", keep=bool(os.environ.get(ENV_KEEP_LOGS)))
        base_name = name or f"w{uuid.uuid4().hex[:10]}"
        command = [
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            "-P", pool, "-c", str(concurrency), "-l", "INFO",
            "-n", f"{base_name}@%h",
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        command += ["--without-heartbeat"] if heartbeat is None else ["--heartbeat-interval", f"{heartbeat:g}"]
        if queues:
            command += ["-Q", ",".join(queues)]
        super().__init__(
            [*command, *extra_args],
            log_path=self.dir / "worker.log",
            cwd=cwd if cwd is not None else self.dir,
            env=python_environment(pythonpath, env or {}),
            name=base_name,
        )

    def start(self) -> Self:
        """Start the worker and wait until it consumes, with all its pool; killed if it does not."""
        super().start()
        try:
            pattern = re.compile(rf"({re.escape(self.name)}@\S+) ready\.")
            ready = self.wait_for(lambda: pattern.search(self.log), self.startup_timeout, what="ready")
            self.hostname = ready.group(1)
            if self.pool == "prefork":
                # The pool starts before the consumer, but make sure that every
                # process is there before a test looks for them.  The other
                # pools run their tasks in the main process.
                self.wait_for(
                    lambda: len(self.child_pids()) >= self.concurrency, 10, what=f"{self.concurrency} pool processes"
                )
        except BaseException:
            self.kill()
            raise
        return self

    def pool_pids(self) -> list[int]:
        """The pids of the pool processes (the live children of the main process)."""
        return self.child_pids()

    def ping(self, app: Any, timeout: float = 1.0) -> bool:
        """Whether the worker answers a remote-control ping sent through ``app``."""
        if self.hostname is None:
            return False
        replies = app.control.inspect(destination=[self.hostname], timeout=timeout).ping() or {}
        return self.hostname in replies

    def close(self) -> None:
        """Stop the worker (warm) and delete its directory, unless ``DLOCK_TEST_KEEP_LOGS`` is set."""
        self.stop()
        if not os.environ.get(ENV_KEEP_LOGS):
            remove_scratch_dir(self.dir)
