"""Real ``celery worker`` subprocesses for tests.

A :class:`CeleryWorker` runs ``python -m celery -A worker_app worker -P
prefork`` as a child process in its own session, with ``tests/`` as the
working directory and on ``PYTHONPATH`` so that ``worker_app`` (and the
helpers it imports) can be imported.  The broker, lock and recorder URLs reach
the app through the environment variables named in :mod:`worker_app`.

The worker counts as started once its log says ``<name> ready.``; it logs to a
file that :attr:`CeleryWorker.log` reads back at any time.  :meth:`stop` is a
warm shutdown (``SIGTERM`` to the main process, which lets running tasks
finish), :meth:`kill` sends ``SIGKILL`` to the whole process group (the main
process and its pool).  Whatever is still alive when the interpreter exits is
killed, so an interrupted test run leaves no worker behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Self

try:
    import psutil  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # pragma: no cover - psutil is in the test environment
    psutil = None

__all__ = ["CeleryWorker", "WorkerError", "wait_until"]

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

#: Environment variables read by ``worker_app``.
ENV_BROKER = "DLOCK_TEST_BROKER_URL"
ENV_LOCKS = "DLOCK_TEST_LOCK_URLS"
ENV_RECORDER = "DLOCK_TEST_RECORDER_URL"
#: Set to keep the workers' logs (``/tmp/dlock-worker-*/worker.log``) after a run.
ENV_KEEP_LOGS = "DLOCK_TEST_KEEP_LOGS"

T = TypeVar("T")

_live: set[CeleryWorker] = set()
_log_dirs: set[Path] = set()


@atexit.register
def _reap() -> None:
    for worker in list(_live):
        worker.kill()
    if not os.environ.get(ENV_KEEP_LOGS):
        for path in list(_log_dirs):
            shutil.rmtree(path, ignore_errors=True)
    _log_dirs.clear()


class WorkerError(RuntimeError):
    """A worker did not start, or did not stop, as expected."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises :class:`AssertionError` naming ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


class CeleryWorker:
    """One ``celery worker`` subprocess running ``worker_app``.

    Arguments:
        broker_url: The broker and result backend (``redis://``).
        lock_urls: The lock nodes, for ``dlock_redis_url``.
        recorder_url: Where the test tasks record what they did.
        concurrency: Pool processes (``-c``).
        pool: The pool (``-P``).
        queues: Queues to consume (``-Q``); by default Celery's ``celery``.
        extra_args: More ``celery worker`` arguments, such as ``-E`` or
            ``--time-limit``.
        env: More environment variables for the worker (``worker_app``
            reads a few, see there).
        name: The node name before the ``@``; unique by default.
        app_module: What ``-A`` imports, from ``tests/`` or the repository root.
        startup_timeout: Seconds :meth:`start` waits for ``ready``.
    """

    def __init__(
        self,
        *,
        broker_url: str,
        lock_urls: Sequence[str],
        recorder_url: str,
        concurrency: int = 4,
        pool: str = "prefork",
        queues: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        app_module: str = "worker_app",
        startup_timeout: float = 30.0,
    ) -> None:
        self.broker_url = broker_url
        self.lock_urls = list(lock_urls)
        self.recorder_url = recorder_url
        self.concurrency = concurrency
        self.pool = pool
        self.queues = list(queues)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.base_name = name or f"w{uuid.uuid4().hex[:10]}"
        self.app_module = app_module
        self.startup_timeout = startup_timeout
        #: The full node name (``base@host``) once the worker is ready.
        self.hostname: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        #: The worker's directory, holding its log; deleted by :meth:`close`,
        #: or when the interpreter exits.
        self.dir = Path(tempfile.mkdtemp(prefix="dlock-worker-"))
        _log_dirs.add(self.dir)
        self.log_path = self.dir / "worker.log"

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running and self.proc else "stopped"
        return f"<{type(self).__name__} {self.base_name} {state}>"

    # -- starting ---------------------------------------------------------------

    def command(self) -> list[str]:
        """The command line of the worker."""
        command = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-l", "INFO",
            "-n", f"{self.base_name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        if self.queues:
            command += ["-Q", ",".join(self.queues)]
        return command + self.extra_args

    def environment(self) -> dict[str, str]:
        """The worker's environment: ours, plus the URLs and the import path."""
        env = dict(os.environ)
        path = [str(TESTS_DIR), str(REPO_DIR)]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(path),
                "PYTHONUNBUFFERED": "1",
                ENV_BROKER: self.broker_url,
                ENV_LOCKS: ",".join(self.lock_urls),
                ENV_RECORDER: self.recorder_url,
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        """Start the worker and wait until it consumes; raises with the log tail."""
        if self.running:
            raise WorkerError(f"{self!r} is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=TESTS_DIR,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill()
            )
        _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        pattern = re.compile(rf"({re.escape(self.base_name)}@\S+) ready\.")
        deadline = time.monotonic() + self.startup_timeout
        while True:
            match = pattern.search(self.log)
            if match:
                self.hostname = match.group(1)
                break
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise WorkerError(f"worker {self.base_name} exited with {code} during startup:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise WorkerError(
                    f"worker {self.base_name} not ready within {self.startup_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        # The pool is started before the consumer, but make sure every
        # process is there before a test looks for them.
        wait_until(
            lambda: len(self.pool_pids()) >= self.concurrency or not self.running,
            10,
            message=lambda: f"{self.concurrency} pool processes of {self.base_name}:\n{self.log_tail()}",
        )

    # -- looking at it ------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The main process's pid."""
        if self.proc is None:
            raise WorkerError(f"{self!r} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the main process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The main process's exit status, once it has exited."""
        return None if self.proc is None else self.proc.poll()

    @property
    def log(self) -> str:
        """Everything the worker has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log.splitlines()[-lines:]) or "(no output)"

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``."""
        compiled = re.compile(pattern)
        return wait_until(
            lambda: compiled.search(self.log),
            timeout,
            interval=0.05,
            message=lambda: f"{pattern!r} in the log of {self.base_name}:\n{self.log_tail()}",
        )

    def pool_pids(self) -> list[int]:
        """The pids of the main process's children: the pool processes."""
        if not self.running:
            return []
        return sorted(_children(self.pid))

    def group_pids(self) -> list[int]:
        """Every live process in the worker's process group, the main one included."""
        if self.proc is None:
            return []
        return sorted(_process_group(self.proc.pid))

    def ping(self, app: Any, timeout: float = 1.0) -> bool:
        """Whether the worker answers a remote-control ping sent through ``app``."""
        if self.hostname is None:
            return False
        replies = app.control.inspect(destination=[self.hostname], timeout=timeout).ping() or {}
        return self.hostname in replies

    # -- stopping -------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the main process only."""
        if self.running:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown: ``SIGTERM`` to the main process, which lets running
        tasks finish; ``SIGKILL`` to the whole group after ``timeout`` seconds.

        Returns the main process's exit status.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        code = self.proc.poll()
        self.kill()  # the pool, if anything of it is left, and a hung main process
        return code if code is not None else self.returncode

    def kill(self) -> None:
        """``SIGKILL`` the main process and its pool at once, and reap them."""
        if self.proc is None:
            return
        _kill_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL is not ignorable
            self.proc.wait(10)
        wait_until(lambda: not _process_group(self.proc.pid), 10, message="the worker's processes to exit")  # type: ignore[union-attr]
        _live.discard(self)

    def close(self) -> None:
        """Stop the worker and delete its log, unless ``DLOCK_TEST_KEEP_LOGS`` is set."""
        self.stop()
        if not os.environ.get(ENV_KEEP_LOGS):
            shutil.rmtree(self.dir, ignore_errors=True)
            _log_dirs.discard(self.dir)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- processes -------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """Live (not zombie) children of ``pid``: a pool process that died stays a
    zombie until the main process reaps it, which may take seconds."""
    if psutil is not None:
        found = set()
        try:
            children = psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            return set()
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
            except psutil.NoSuchProcess:
                continue
        return found
    return {proc for proc, (parent, _group) in _proc_table(alive_only=True) if parent == pid}


def _process_group(pgid: int) -> set[int]:
    """Live (not zombie) processes in the process group ``pgid``."""
    if psutil is not None:
        found = set()
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pgid:
                    found.add(proc.info["pid"])
            except (ProcessLookupError, psutil.Error):
                continue
        return found
    return {proc for proc, (_parent, group) in _proc_table(alive_only=True) if group == pgid}


def _proc_table(alive_only: bool = False) -> Iterable[tuple[int, tuple[int, int]]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if alive_only and fields[0] == "Z":
            continue
        yield int(entry.name), (int(fields[1]), int(fields[2]))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
