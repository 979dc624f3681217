"""The process scenario 5 measures: it holds many auto-extended locks.

Run by :mod:`benchmarks.memory` as ``python -m benchmarks.memory_probe``, so
that nothing else lives in the process: it connects, acquires ``--locks``
keys with auto-extension, holds them for ``--duration`` seconds while
sampling its own resident memory and thread count from
``/proc/self/status``, releases them, and prints one JSON object (see
:class:`Probe`) on standard output.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

__all__ = ["LIBRARIES", "Probe", "Sample", "main", "status"]

#: The libraries the probe can hold locks with.
LIBRARIES = ("ours", "python-redis-lock")

#: The name of our watchdog thread.
WATCHDOG_THREAD = "celery-dlock-watchdog"


@dataclass(frozen=True)
class Sample:
    """One reading: seconds since the locks were acquired, RSS in KiB, threads."""

    at: float
    rss_kib: int
    threads: int


@dataclass
class Probe:
    """What the probe measured.

    Attributes:
        library: Which library held the locks.
        locks: How many locks were held.
        ttl: Their lease, in seconds.
        before: Connected, nothing acquired yet.
        acquired: Right after acquiring every lock.
        samples: Readings while holding, the last at the end of the hold.
        acquire_seconds: How long acquiring them all took.
        renewals: Extensions performed (``None`` if the library does not count them).
        min_renewals: The fewest extensions of any one lock (``None`` likewise).
        failures: Locks reported lost, or found lost at the end.
        watchdog_threads: Threads named like our watchdog, at the end of the hold.
        hold_commands: Commands the server ran during the hold.
        released: Locks whose release confirmed they were still held.

    """

    library: str
    locks: int
    ttl: float
    before: Sample
    acquired: Sample
    samples: list[Sample] = field(default_factory=list)
    acquire_seconds: float = 0.0
    renewals: int | None = None
    min_renewals: int | None = None
    failures: int = 0
    watchdog_threads: int = 0
    hold_commands: int = 0
    released: int = 0


def status() -> tuple[int, int]:
    """The resident set size (KiB) and thread count of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return int(fields["VmRSS"][0]), int(fields["Threads"][0])


def _sample(since: float) -> Sample:
    rss, threads = status()
    return Sample(round(time.monotonic() - since, 3), rss, threads)


class _Held:
    """Locks held by one library: acquire them all, count, release."""

    def __init__(self, acquire: Callable[[str], Any], release: Callable[[Any], bool]) -> None:
        self._acquire = acquire
        self._release = release
        self.locks: list[Any] = []

    def acquire_all(self, keys: Sequence[str]) -> None:
        self.locks = [self._acquire(key) for key in keys]

    def release_all(self) -> int:
        return sum(1 for lock in self.locks if self._release(lock))


def _ours(url: str, ttl: float, lost: list[str], locks: int) -> _Held:
    from celery_dlock import Redlock

    redlock = Redlock([url])

    def on_lost(lock: Any, error: Exception) -> None:
        lost.append(lock.key)

    def acquire(key: str) -> Any:
        return redlock.acquire(key, ttl, blocking=False, auto_extend=True, on_lost=on_lost)

    return _Held(acquire, lambda lock: bool(lock.release()))


def _python_redis_lock(url: str, ttl: float, lost: list[str], locks: int) -> _Held:
    import redis_lock

    # One renewal thread per lock: at worst every one of them holds a
    # connection of the shared pool at once (redis-py's default cap is 100).
    client = redis.Redis.from_url(url, max_connections=locks + 16)

    def acquire(key: str) -> Any:
        lock = redis_lock.Lock(client, key, expire=int(ttl), auto_renewal=True)
        if not lock.acquire(blocking=False):
            raise RuntimeError(f"python-redis-lock: {key} was held")
        return lock

    def release(lock: Any) -> bool:
        try:
            lock.release()
        except redis_lock.NotAcquired:
            lost.append(repr(lock))
            return False
        return True

    return _Held(acquire, release)


def probe(library: str, url: str, *, locks: int, ttl: float, duration: float, interval: float) -> Probe:
    """Hold ``locks`` auto-extended locks for ``duration`` seconds, sampling."""
    lost: list[str] = []
    held = (_ours if library == "ours" else _python_redis_lock)(url, ttl, lost, locks)
    server = redis.Redis.from_url(url)
    server.ping()
    start = time.monotonic()
    before = _sample(start)
    held.acquire_all([f"bench:memory:{library}:{n}" for n in range(locks)])
    acquired_at = time.monotonic()
    server.config_resetstat()
    result = Probe(
        library,
        locks,
        ttl,
        before,
        _sample(acquired_at),
        acquire_seconds=acquired_at - start,
    )
    deadline = acquired_at + duration
    while (now := time.monotonic()) < deadline:
        time.sleep(min(interval, deadline - now))
        result.samples.append(_sample(acquired_at))
    stats = server.info("commandstats")
    result.hold_commands = sum(
        int(value["calls"]) for name, value in stats.items() if not name.endswith(("config", "info"))
    )
    result.watchdog_threads = sum(1 for thread in threading.enumerate() if thread.name == WATCHDOG_THREAD)
    if library == "ours":
        result.renewals = sum(lock.extensions for lock in held.locks)
        result.min_renewals = min(lock.extensions for lock in held.locks)
        result.failures = len(set(lost) | {lock.key for lock in held.locks if lock.lost})
    result.released = held.release_all()
    if library != "ours":
        result.failures = len(lost)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, probe, print the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_probe")
    parser.add_argument("--library", choices=LIBRARIES, default="ours")
    parser.add_argument("--url", required=True, help="the redis-server to lock on")
    parser.add_argument("--locks", type=int, default=1000)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    result = probe(
        args.library,
        args.url,
        locks=args.locks,
        ttl=args.ttl,
        duration=args.duration,
        interval=args.interval,
    )
    json.dump(asdict(result), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
