"""``celery dlock top``: a live view of the hottest keys and the busy and lost rates.

:class:`Top` samples the nodes: every held lock with its holder and how
long it has been held, the waiters blocked on each key (subscribers of its
release channel, ``PUBSUB NUMSUB``) and the messages parked behind it, and
the counters of each task, whose differences over the last minute give the
rates.  :func:`render` turns a :class:`Frame` into lines of text, the same
for the live view (:func:`run_live`, with curses) and for the single table
printed when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import curses
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from celery import Celery

from ..celery.app_state import locks_for
from .inspect import OPERATOR_TIMEOUT, HeldLock, connected, held_locks
from .tables import duration, table

__all__ = ["RATES", "WINDOW", "Frame", "KeyRow", "TaskRow", "Top", "render", "run_live", "sample_twice"]

#: Seconds of counter history the rates are computed over.
WINDOW: Final = 60.0

#: The counters shown as rates per minute, per task.
RATES: Final = ("acquired", "busy", "lost")

_KEY_COLUMNS: Final = ("KEY", "TASK", "TASK ID", "HOST", "PID", "TOKEN", "HELD", "WAITERS", "PARKED")


@dataclass(frozen=True)
class KeyRow:
    """A held lock and what is queued on it."""

    lock: HeldLock
    #: Acquirers blocked on the key right now (``on_busy="wait"``).
    waiters: int
    #: Messages parked behind it (``on_busy="queue"`` or ``"coalesce"``).
    parked: int

    @property
    def heat(self) -> tuple[int, float]:
        """What makes a key hot: those waiting on it first, then how long it has been held."""
        return self.waiters + self.parked, self.lock.held_for or 0.0


@dataclass(frozen=True)
class TaskRow:
    """One task's rates over the window, per minute; ``None`` before there are two samples."""

    task: str
    rates: dict[str, float | None]


@dataclass(frozen=True)
class Frame:
    """One sample, hottest keys first."""

    at: float
    keys: list[KeyRow]
    tasks: list[TaskRow]
    #: Seconds the rates cover (0 until the second sample).
    window: float


class Top:
    """Samples ``app``'s nodes, keeping the counters of the last :data:`WINDOW` seconds."""

    def __init__(self, app: Celery, *, window: float = WINDOW) -> None:
        self.app = app
        self.window = window
        self._samples: deque[tuple[float, dict[str, dict[str, int]]]] = deque()

    def sample(self) -> Frame:
        """Read the nodes now."""
        locks = locks_for(self.app)
        held = held_locks(self.app)
        space = locks.redlock.keyspace
        waiters: dict[str, int] = {}
        with connected(locks, OPERATOR_TIMEOUT) as nodes:
            for _name, client in nodes:
                channels = [space.released(lock.key) for lock in held]
                counts = dict(client.pubsub_numsub(*channels)) if channels else {}
                for lock, channel in zip(held, channels, strict=True):
                    found = int(counts.get(channel.encode(), 0))
                    waiters[lock.key] = max(waiters.get(lock.key, 0), found)
        single = len(locks.settings.redis_url) == 1
        rows = [
            KeyRow(lock, waiters.get(lock.key, 0), len(locks.handoff_queue.queued(lock.key)) if single else 0)
            for lock in held
        ]
        rows.sort(key=lambda row: row.heat, reverse=True)
        now = time.monotonic()
        self._samples.append((now, locks.redlock.stats()))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        return Frame(time.time(), rows, self._rates(), self._samples[-1][0] - self._samples[0][0])

    def _rates(self) -> list[TaskRow]:
        (first_at, first), (last_at, last) = self._samples[0], self._samples[-1]
        elapsed = last_at - first_at
        rows = []
        for task, counts in sorted(last.items()):
            before = first.get(task, {})
            rates: dict[str, float | None] = {
                event: (counts.get(event, 0) - before.get(event, 0)) * 60 / elapsed if elapsed > 0 else None
                for event in RATES
            }
            rows.append(TaskRow(task, rates))
        return rows


def render(frame: Frame, *, height: int | None = None) -> list[str]:
    """The lines of one frame; with ``height``, the key table is cut to fit."""
    waiting = sum(row.waiters for row in frame.keys)
    parked = sum(row.parked for row in frame.keys)
    clock = time.strftime("%H:%M:%S", time.localtime(frame.at))
    span = f"last {frame.window:.0f}s" if frame.window else "rates from the next refresh"
    lines = [f"celery dlock top  {clock}  {len(frame.keys)} held, {waiting} waiting, {parked} parked  ({span})", ""]
    task_lines = _task_table(frame.tasks).splitlines() if frame.tasks else ["no counters yet"]
    keys = frame.keys
    if height is not None:
        room = max(1, height - len(lines) - len(task_lines) - 3)
        keys = keys[:room]
    if keys:
        lines += table(_KEY_COLUMNS, [_key_row(row) for row in keys]).splitlines()
        if len(keys) < len(frame.keys):
            lines.append(f"... {len(frame.keys) - len(keys)} more")
    else:
        lines.append("no held locks")
    return [*lines, "", *task_lines]


def _key_row(row: KeyRow) -> list[str]:
    lock = row.lock
    return [
        lock.key,
        lock.task or "-",
        lock.task_id or "-",
        lock.hostname or "-",
        str(lock.pid) if lock.pid is not None else "-",
        str(lock.token),
        duration(lock.held_for),
        str(row.waiters),
        str(row.parked),
    ]


def _task_table(tasks: Sequence[TaskRow]) -> str:
    headers = ["TASK", *(f"{event.upper()}/MIN" for event in RATES)]
    return table(headers, [[row.task, *(_rate(row.rates[event]) for event in RATES)] for row in tasks])


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_live(top: Top, interval: float) -> None:
    """Redraw every ``interval`` seconds until ``q`` (or Ctrl-C); the terminal is restored on exit."""

    def loop(screen: Any) -> None:
        with contextlib.suppress(curses.error):  # a terminal that cannot hide its cursor
            curses.curs_set(0)
        while True:
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(render(top.sample(), height=height - 1)[: height - 1]):
                screen.addnstr(y, 0, line, max(1, width - 1))
            screen.addnstr(height - 1, 0, "q: quit", max(1, width - 1))
            screen.refresh()
            if _quit_within(screen, interval):
                return

    with contextlib.suppress(KeyboardInterrupt):
        curses.wrapper(loop)


def _quit_within(screen: Any, seconds: float) -> bool:
    """Wait up to ``seconds`` for a key; whether it was ``q``."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        screen.timeout(max(1, int(left * 1000)))
        if screen.getch() in (ord("q"), ord("Q")):
            return True
    return False


def sample_twice(top: Top, interval: float) -> Frame:
    """Two samples ``interval`` apart, so the single table has rates too."""
    top.sample()
    time.sleep(interval)
    return top.sample()
