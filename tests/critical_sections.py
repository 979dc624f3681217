"""Critical sections that record what they did, for mutual-exclusion checks.

Every holder appends ``(key, token, enter_ns, exit_ns)`` to a Redis list on a
recorder server that is separate from the lock nodes, and increments a counter
with a read-modify-write that sleeps in the middle, so a second holder inside
the section at the same time would lose an update.  ``time.monotonic_ns()``
is one clock for every process on a machine, so intervals recorded by
different processes can be compared exactly.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from celery_dlock import LockBusy, Redlock

HISTORY = "history"
COUNTER = "counter"


@dataclass(frozen=True)
class Section:
    """One recorded critical section."""

    key: str
    token: int
    enter: int
    exit: int


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
            leave = time.monotonic_ns()
            recorder.rpush(HISTORY, f"{key} {lock.token} {enter} {leave}")
        done += 1
    return done


def read_sections(recorder: redis.Redis) -> list[Section]:
    """The sections recorded so far."""
    sections = []
    for raw in recorder.lrange(HISTORY, 0, -1):
        key, token, enter, leave = raw.decode().split()
        sections.append(Section(key, int(token), int(enter), int(leave)))
    return sections


def overlaps(sections: Sequence[Section]) -> list[tuple[Section, Section]]:
    """Pairs of sections on the same key whose intervals intersect."""
    found = []
    by_key: dict[str, list[Section]] = {}
    for section in sections:
        by_key.setdefault(section.key, []).append(section)
    for group in by_key.values():
        group.sort(key=lambda s: s.enter)
        for before, after in itertools.pairwise(group):
            if after.enter < before.exit:
                found.append((before, after))
    return found


def tokens_rise_in_order(sections: Sequence[Section]) -> bool:
    """Whether, per key, each later section holds a strictly larger token."""
    ordered = sorted(sections, key=lambda s: s.enter)
    last: dict[str, int] = {}
    for section in ordered:
        if section.token <= last.get(section.key, -1):
            return False
        last[section.key] = section.token
    return True
