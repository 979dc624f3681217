"""``celery dlock top`` in a real terminal (tmux) and with stdout not a terminal.

The keys are held by this process: one with a waiter blocked on it
(``on_busy="wait"``), one with a message parked behind it.  ``top`` runs as
``celery -A worker_app dlock top``: in a tmux pane of a private tmux server,
read with ``capture-pane`` and quit with ``send-keys``; and with its output
piped, where it prints one table and exits.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.commands import app_command
from support.worker_stack import Stack, new_key, stacks

from celery_dlock import Redlock
from celery_dlock.lock.handoff import HandoffQueue
from celery_dlock.testing.polling import wait_until

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)"),
]

TASK = "proj.charge"


@pytest.fixture
def stack() -> Iterator[Stack]:
    with stacks() as make:
        yield make()


@pytest.fixture
def busy(stack: Stack) -> Iterator[SimpleNamespace]:
    """A key held with a waiter blocked on it, and a key held with one message parked behind it."""
    redlock = Redlock(stack.lock_urls, retry_delay=0.05)
    waited, queued = new_key("waited"), new_key("queued")
    holder = redlock.acquire(waited, ttl=30, label="task-1", count_as=TASK, details={"task": TASK})
    waiter = threading.Thread(target=lambda: redlock.acquire(waited, ttl=30, timeout=30, count_as=TASK).release())
    waiter.start()
    queue = HandoffQueue(redlock)
    queue_holder = queue.acquire(queued, ttl=30, label="task-2", details={"task": TASK})
    queue.park(queued, "ticket-1", json.dumps({"task": TASK}).encode(), max_queued=10)
    wait_until(lambda: stack.locks.pubsub_numsub(redlock.keyspace.released(waited))[0][1] == 1)
    redlock.flush_counts()  # this process's counts, for the rates
    yield SimpleNamespace(redlock=redlock, waited=waited, queued=queued)
    holder.release()
    waiter.join(10)
    queue_holder.release()
    redlock.close()


def test_top_prints_one_table_when_not_a_terminal(stack: Stack, busy: SimpleNamespace) -> None:
    command, env = app_command(stack, "dlock", "top", "--interval", "0.2")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("celery dlock top") and "2 held, 1 waiting, 1 parked" in lines[0]
    assert lines[2].split() == ["KEY", "TASK", "TASK", "ID", "HOST", "PID", "TOKEN", "HELD", "WAITERS", "PARKED"]
    hottest = [line.split() for line in lines[3:5]]
    assert {(row[0], row[1], row[-2], row[-1]) for row in hottest} == {
        (busy.waited, TASK, "1", "0"),
        (busy.queued, TASK, "0", "1"),
    }
    assert lines[6].split() == ["TASK", "ACQUIRED/MIN", "BUSY/MIN", "LOST/MIN"]
    assert lines[7].split()[0] == TASK and "\x1b" not in done.stdout, "plain text, no terminal codes"


class Tmux:
    """A private tmux server (its own socket and an empty config) running one pane."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"dlock-top-{uuid.uuid4().hex[:8]}"
        self.config = tmp_path / "tmux.conf"
        self.config.write_text("set -g remain-on-exit on\n")
        self.status, self.stderr = tmp_path / "status", tmp_path / "stderr"

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> str:
        command = ["tmux", "-L", self.socket, "-f", str(self.config), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=10).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def run(self, command: list[str], env: dict[str, str]) -> None:
        """Run ``command`` in the pane of a new session ``top``; its exit status and stderr go to files.

        bash, unlike dash, outlives a Ctrl-C that its command handled, to write the status.
        """
        line = f"{shlex.join(command)} 2>{shlex.quote(str(self.stderr))}; echo $? >{shlex.quote(str(self.status))}"
        self("new-session", "-d", "-s", "top", "-x", "160", "-y", "30", "exec bash -c " + shlex.quote(line), env=env)

    def exit_status(self) -> str | None:
        """The exit status of the pane's command, once it has exited."""
        return self.status.read_text().strip() if self.status.exists() else None


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    yield server
    subprocess.run(["tmux", "-L", server.socket, "kill-server"], capture_output=True, check=False)


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_live_in_a_real_terminal(stack: Stack, busy: SimpleNamespace, tmux: Tmux, key: str) -> None:
    command, env = app_command(stack, "dlock", "top")
    tmux.run(command, env)
    screen = wait_until(lambda: busy.queued in (text := tmux.screen()) and text, 20, message=tmux.screen)
    assert "celery dlock top" in screen and "2 held, 1 waiting, 1 parked" in screen
    assert "WAITERS  PARKED" in screen and "BUSY/MIN" in screen and "q: quit" in screen

    later = busy.redlock.acquire(new_key("later"), ttl=30, details={"task": TASK})
    wait_until(lambda: later.key in tmux.screen(), 10, message=tmux.screen)  # it refreshes on its own
    wait_until(lambda: re.search(r"\(last \d+s\)", tmux.screen()), 10, message=tmux.screen)  # rates now

    tmux("send-keys", "-t", "top", key)
    status = wait_until(tmux.exit_status, 10, message=tmux.screen)
    assert status == "0", tmux.stderr.read_text()
    assert "Traceback" not in tmux.stderr.read_text()
    later.release()
