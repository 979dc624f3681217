"""Child processes of a test run: started apart, logged to a file, never left behind.

:class:`ManagedProcess` is the one process launcher of the testing helpers:
the throwaway ``redis-server`` of :mod:`celery_dlock.testing.redis_process`,
the ``celery worker`` of :mod:`celery_dlock.testing.worker_process`, and
whatever else a test suite runs (``celery beat``, lock holders).  Each runs
in a session, and so a process group, of its own: :meth:`~ManagedProcess.kill`
takes the process and everything it forked at once.  Whatever is still alive
when the interpreter exits is killed, and the scratch directories made by
:func:`scratch_dir` are deleted, so an interrupted run leaves nothing behind.

Only the standard library is imported; process tables come from ``/proc``,
or from ``ps`` where there is none.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from .polling import wait_until

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Lifecycle",
    "ManagedProcess",
    "ProcessError",
    "log_tails",
    "python_environment",
    "remove_scratch_dir",
    "scratch_dir",
]

T = TypeVar("T")

_live: set[ManagedProcess] = set()
_scratch: set[Path] = set()


@atexit.register
def _reap_leftovers() -> None:
    for process in list(_live):
        process.kill()
    for path in list(_scratch):
        remove_scratch_dir(path)


def scratch_dir(prefix: str, *, keep: bool = False) -> Path:
    """A new temporary directory, deleted when the interpreter exits unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not keep:
        _scratch.add(path)
    return path


def remove_scratch_dir(path: Path) -> None:
    """Delete a directory made by :func:`scratch_dir`, now."""
    shutil.rmtree(path, ignore_errors=True)
    _scratch.discard(path)


class ProcessError(RuntimeError):
    """A managed process did not start, exited too early, or is not running."""


class Lifecycle:
    """What the helpers here do as context managers: start on entry unless running, stop on exit."""

    @property
    def running(self) -> bool:
        """Whether it is running now."""
        raise NotImplementedError

    def start(self) -> Self:
        """Start it; returns itself."""
        raise NotImplementedError

    def stop(self) -> object:
        """Stop it, and clean up what it made."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ManagedProcess(Lifecycle):
    """One run of a command, in its own process group, its output in a log file.

    :meth:`start` launches it; :meth:`wait_for` and :meth:`wait_for_log` wait
    for it to get somewhere, failing at once if it exits first.  :meth:`stop`
    asks it to exit (``SIGTERM``) and kills what is left after a while;
    :meth:`kill` sends ``SIGKILL`` to the whole group and waits until every
    process of the group is gone.  Used as a context manager it is started on
    entry (unless running) and stopped on exit.

    Attributes:
        command: The command line.
        log_path: Where its standard output and error go (appended to).
        name: What messages call it.
        proc: The process, once started; it stays set after the process exits.
        paused: Whether :meth:`pause` stopped it and nothing resumed it since.

    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        log_path: Path,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.name = name or Path(self.command[0]).name
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {state}>"

    # -- starting -------------------------------------------------------------------

    def start(self) -> Self:
        """Launch the command; returns at once (see :meth:`wait_for`)."""
        if self.running:
            raise ProcessError(f"{self!r} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, for kill()
            )
        self.paused = False
        _live.add(self)
        return self

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        *,
        what: str,
        interval: float = 0.05,
    ) -> T:
        """Wait until ``predicate`` returns something truthy, and return that.

        Raises:
            ProcessError: the process exited first; the message ends with its log.
            AssertionError: ``timeout`` seconds passed; the message ends with its log.

        """

        def check() -> T | None:
            value = predicate()
            if not value and not self.running:
                raise ProcessError(
                    f"{self.name} exited with {self.returncode} while waiting for {what}:\n{self.log_tail()}"
                )
            return value

        return wait_until(
            check, timeout, interval=interval, message=lambda: f"{what} from {self.name}:\n{self.log_tail()}"
        )

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``; returns the match."""
        compiled = re.compile(pattern)
        return self.wait_for(lambda: compiled.search(self.log), timeout, what=f"{compiled.pattern!r} in the log")

    # -- looking at it --------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The process id."""
        if self.proc is None:
            raise ProcessError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited (a paused one is running)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (``-9`` after ``SIGKILL``), else ``None``."""
        return None if self.proc is None else self.proc.poll()

    @property
    def log(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log.splitlines()[-lines:]) or "(no output)"

    def child_pids(self) -> list[int]:
        """The live (not zombie) children of the process, such as a worker's pool."""
        if not self.running:
            return []
        return sorted(pid for pid, parent, _group in _process_table() if parent == self.pid)

    def group_pids(self) -> list[int]:
        """Every live (not zombie) process of its process group, itself included."""
        if self.proc is None:
            return []
        return sorted(pid for pid, _parent, group in _process_table() if group == self.proc.pid)

    # -- signals and stopping ------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process alone; nothing if it is not running."""
        if self.running:
            os.kill(self.pid, signum)

    def pause(self) -> None:
        """Freeze the process with ``SIGSTOP``."""
        self._require_running()
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """Unfreeze a process frozen by :meth:`pause`."""
        self._require_running()
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; returns its status.

        Raises:
            subprocess.TimeoutExpired: it was still running after ``timeout`` seconds.

        """
        if self.proc is None:
            raise ProcessError(f"{self.name} was never started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ask the process to exit and wait for it; kill what is left after ``timeout`` seconds.

        ``SIGTERM`` goes to the process alone (a celery worker then lets its
        running tasks finish), followed by ``SIGCONT`` in case it is paused.
        Whatever of its group is still alive afterwards is killed.

        Returns:
            The exit status of the process, or ``None`` if it was never started.

        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        code = proc.poll()
        self.kill()
        return code if code is not None else proc.returncode

    def kill(self) -> None:
        """``SIGKILL`` the whole process group at once, and wait until all of it is gone."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
            proc.wait(10)
        wait_until(lambda: not self._group_alive(), 10, message=f"the processes of {self.name} to exit")
        self.paused = False
        _live.discard(self)

    def _require_running(self) -> None:
        if not self.running:
            raise ProcessError(f"{self!r} is not running")

    def _group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        # Someone is in the group, maybe only zombies no one has reaped yet.
        return bool(self.group_pids())


def python_environment(
    pythonpath: Sequence[str | os.PathLike[str]] = (), extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a Python child process: ours, with changes.

    ``pythonpath`` goes first on its ``PYTHONPATH``, its output is unbuffered
    (so that its log is current) and ``extra`` is added last.
    """
    env = dict(os.environ)
    path = [os.fspath(entry) for entry in pythonpath]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def log_tails(processes: Iterable[ManagedProcess], lines: int = 30) -> str:
    """The last ``lines`` lines of each process's log, each under its name."""
    return "\n".join(f"--- {process.name} ---\n{process.log_tail(lines)}" for process in processes)


def _process_table() -> list[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every live process that is not a zombie."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return _ps_table()
    table = []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            table.append((int(entry.name), int(fields[1]), int(fields[2])))
    return table


def _ps_table() -> list[tuple[int, int, int]]:
    output = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    table = []
    for line in output.splitlines():
        pid, parent, group, state = line.split()[:4]
        if not state.startswith("Z"):
            table.append((int(pid), int(parent), int(group)))
    return table
