"""Critical sections that record what they did, for mutual-exclusion checks.

Every holder appends ``key token enter_ns exit_ns`` (:func:`record_section`)
to the :data:`HISTORY` list on a recorder server apart from the lock nodes,
and :func:`run_sections` also increments a counter with a read-modify-write
that sleeps in the middle, so a second holder inside at the same time loses
an update.  :func:`read_sections` reads the history back as :class:`Section`
records, which :func:`celery_dlock.testing.intervals.overlaps` and
:func:`~celery_dlock.testing.intervals.falling_tokens` judge: the one
interval checker, shared with the pytest plugin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from celery_dlock import LockBusy, Redlock
from celery_dlock.aio import AsyncRedlock

__all__ = [
    "COUNTER",
    "HISTORY",
    "Section",
    "counted_section",
    "read_sections",
    "record_section",
    "run_counted_sections",
    "run_sections",
]

HISTORY = "history"
COUNTER = "counter"


@dataclass(frozen=True)
class Section:
    """One recorded critical section: its key, the token it held, when it was entered and left.

    ``start`` and ``end`` name ``enter`` and ``exit`` as
    :class:`celery_dlock.testing.intervals.Interval` does.
    """

    key: str
    token: int
    enter: int
    exit: int

    @property
    def start(self) -> int:
        return self.enter

    @property
    def end(self) -> int:
        return self.exit


def record_section(recorder: redis.Redis, key: str, token: int, enter: int, leave: int) -> None:
    """Append one section to the history (``time.monotonic_ns()`` times)."""
    recorder.rpush(HISTORY, f"{key} {token} {enter} {leave}")


def read_sections(recorder: redis.Redis) -> list[Section]:
    """The sections recorded so far."""
    sections = []
    for raw in recorder.lrange(HISTORY, 0, -1):
        key, token, enter, leave = raw.decode().split()
        sections.append(Section(key, int(token), int(enter), int(leave)))
    return sections


def run_sections(node_urls: Sequence[str], recorder_url: str, key: str, rounds: int, hold: float = 0.001) -> int:
    """Enter the critical section on ``key`` ``rounds`` times; returns how many ran."""
    redlock = Redlock(list(node_urls), retry_count=1000, retry_delay=0.01, retry_jitter=0.01)
    recorder = redis.Redis.from_url(recorder_url)
    done = 0
    for _ in range(rounds):
        try:
            lock = redlock.acquire(key, ttl=10)
        except LockBusy:
            continue
        with lock:
            enter = time.monotonic_ns()
            value = int(recorder.get(COUNTER) or 0)
            time.sleep(hold)
            recorder.set(COUNTER, value + 1)
            record_section(recorder, key, lock.token, enter, time.monotonic_ns())
        done += 1
    return done


@contextmanager
def counted_section(recorder: redis.Redis, key: str, token: int) -> Iterator[None]:
    """The block as one recorded section on ``key`` that bumps ``counter:<key>`` by read, then write.

    The counter is read on entry and written on exit, so two holders inside
    at once lose an update, whatever the interval checker makes of them.
    """
    counter = f"counter:{key}"
    enter = time.monotonic_ns()
    seen = int(recorder.get(counter) or 0)
    try:
        yield
    finally:
        recorder.set(counter, seen + 1)
        record_section(recorder, key, token, enter, time.monotonic_ns())


def run_counted_sections(
    node_urls: Sequence[str], recorder_url: str, key: str, rounds: int, client: str, limit: int = 1
) -> int:
    """Enter :func:`counted_section` on ``key`` ``rounds`` times, locked by ``client``: ``"sync"`` or ``"async"``.

    Sync :class:`Redlock` and :class:`AsyncRedlock` holders in several
    processes record into one history, so their sections can be judged
    together; with ``limit`` above 1 each holds one of the key's permits.
    """
    recorder = redis.Redis.from_url(recorder_url)
    options = {"retry_count": 1000, "retry_delay": 0.01, "retry_jitter": 0.01}
    if client == "sync":
        redlock = Redlock(list(node_urls), **options)
        for _ in range(rounds):
            with redlock.lock(key, ttl=10, limit=limit) as lock, counted_section(recorder, key, lock.token):
                time.sleep(0.001)
        return rounds

    async def sections() -> int:
        manager = AsyncRedlock(list(node_urls), **options)
        for _ in range(rounds):
            async with manager.lock(key, ttl=10, limit=limit) as held:
                with counted_section(recorder, key, held.token):
                    await asyncio.sleep(0.001)
        await manager.close()
        return rounds

    return asyncio.run(sections())
