"""Scenario 5: memory and threads of a process holding many auto-extended locks.

One fresh process (:mod:`benchmarks.memory_probe`) acquires many keys with
auto-extension and holds them through several renewals.  Ours renews every
lock from one watchdog thread per process; python-redis-lock, the anchor,
starts one renewal thread per lock.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import servers
from .memory_probe import Probe, Sample
from .optional import skipped_note
from .scenario import RunOptions, Scenario, ScenarioResult, Table

__all__ = ["FULL", "QUICK", "SCENARIO", "Size", "run"]

_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """How many locks, their lease, and how long they are held and sampled."""

    locks: int
    ttl: float
    duration: float
    interval: float


#: About 25 s: two probes of 10 s holds, plus acquiring and releasing.
FULL = Size(locks=1000, ttl=3.0, duration=10.0, interval=0.5)
#: About 3 s.
QUICK = Size(locks=100, ttl=1.0, duration=1.5, interval=0.25)

#: Ours renews once a third of the ttl has passed (``Redlock.extend_every``).
EXTEND_EVERY = 1 / 3

METHOD = """\
A fresh Python process connects to a spawned redis-server, acquires N keys
with auto-extension (`Redlock.acquire(key, ttl, auto_extend=True)` for ours,
`redis_lock.Lock(client, key, expire=ttl, auto_renewal=True)` for
python-redis-lock), holds them while reading its own `VmRSS` and `Threads`
from `/proc/self/status` at a fixed interval, then releases them.  Renewals
are `sum(lock.extensions)` (python-redis-lock does not count them); a
failure is a lock reported lost (`on_lost`) or found lost at the end, or
for python-redis-lock a release that found the lock gone.  Server commands
are every command the redis-server ran during the hold (`INFO commandstats`,
reset after acquiring).  python-redis-lock's client may open a connection
per lock (its renewal threads share its pool; redis-py caps a pool at 100
by default, too few for 1,000 threads).  The two libraries run one after
the other, each in its own process.
"""


def run(options: RunOptions) -> ScenarioResult:
    """Probe every installed library on one node, and summarize."""
    size = QUICK if options.quick else FULL
    notes: list[str] = []
    libraries = ["ours"]
    if importlib.util.find_spec("redis_lock") is not None:
        libraries.append("python-redis-lock")
    else:
        notes.append(skipped_note("python-redis-lock"))
    with servers.nodes(1) as cluster:
        probes = [_probe(library, cluster[0].url, size) for library in libraries]
    notes.append(
        f"N = {size.locks} locks, ttl {size.ttl:g} s (ours renews every {size.ttl * EXTEND_EVERY:.1f} s,"
        f" python-redis-lock every {int(size.ttl) * 2 / 3:.1f} s), held {size.duration:g} s,"
        f" sampled every {size.interval:g} s."
    )
    return ScenarioResult(
        name=SCENARIO.name,
        title=SCENARIO.title,
        method=METHOD,
        schedule=None,
        rows=[],
        ratios=[],
        targets=[],
        notes=notes,
        tables=[_summary(probes), _over_time(probes, size), _checks(probes, size)],
    )


SCENARIO = Scenario(name="memory", title="Scenario 5: memory of 1,000 auto-extended locks", run=run)


def _probe(library: str, url: str, size: Size) -> Probe:
    """Run the probe process for ``library`` and read its JSON."""
    command = [
        sys.executable, "-m", "benchmarks.memory_probe",
        "--library", library, "--url", url,
        "--locks", str(size.locks), "--ttl", str(size.ttl),
        "--duration", str(size.duration), "--interval", str(size.interval),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=size.duration + 120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {library} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return _decode(json.loads(done.stdout))


def _decode(raw: dict[str, Any]) -> Probe:
    return Probe(
        **{
            **raw,
            "before": Sample(**raw["before"]),
            "acquired": Sample(**raw["acquired"]),
            "samples": [Sample(**sample) for sample in raw["samples"]],
        }
    )


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _summary(probes: Sequence[Probe]) -> Table:
    rows = []
    for probe in probes:
        end = probe.samples[-1]
        hold = end.at
        rows.append(
            [
                probe.library,
                _mib(probe.before.rss_kib),
                _mib(probe.acquired.rss_kib),
                _mib(end.rss_kib),
                _mib(max(sample.rss_kib for sample in probe.samples)),
                f"{(probe.acquired.rss_kib - probe.before.rss_kib) / probe.locks:.1f}",
                f"{probe.before.threads} / {probe.acquired.threads} / {end.threads}",
                "n/a" if probe.renewals is None else str(probe.renewals),
                str(probe.failures),
                f"{probe.hold_commands / hold:.0f}",
                f"{probe.acquire_seconds * 1000:.0f}",
            ]
        )
    return Table(
        "### Memory and threads",
        [
            "Library",
            "RSS before (MiB)",
            "RSS after acquiring (MiB)",
            "RSS at the end (MiB)",
            "RSS peak (MiB)",
            "KiB per lock",
            "Threads before / holding / end",
            "Renewals",
            "Failures",
            "Server commands/s while holding",
            "Acquiring all (ms)",
        ],
        rows,
    )


def _over_time(probes: Sequence[Probe], size: Size) -> Table:
    """RSS at about every second of the hold (every sample in a short one)."""
    step = max(1, round(1.0 / size.interval))
    picked = [probe.samples[step - 1 :: step] for probe in probes]
    times = [f"{sample.at:.0f} s" if step > 1 else f"{sample.at:.2f} s" for sample in picked[0]]
    return Table(
        "### RSS while holding (MiB)",
        ["Library", "acquired", *times],
        [
            [
                probe.library,
                _mib(probe.acquired.rss_kib),
                *(_mib(sample.rss_kib) for sample in samples),
            ]
            for probe, samples in zip(probes, picked, strict=True)
        ],
    )


def _checks(probes: Sequence[Probe], size: Size) -> Table:
    """Ours: one watchdog thread, every lock renewed on time, none lost."""
    ours = next(probe for probe in probes if probe.library == "ours")
    end = ours.samples[-1]
    added = end.threads - ours.before.threads
    expected = int(size.duration / (size.ttl * EXTEND_EVERY)) - 1
    checks = [
        ("threads added while holding (the one watchdog)", added, added == 1),
        ("watchdog threads", ours.watchdog_threads, ours.watchdog_threads == 1),
        (
            f"fewest renewals of one lock (at least {expected})",
            ours.min_renewals,
            (ours.min_renewals or 0) >= expected,
        ),
        ("renewal failures", ours.failures, ours.failures == 0),
        ("releases confirmed", ours.released, ours.released == ours.locks),
    ]
    return Table(
        "### Checks (ours)",
        ["Check", "Measured", "Verdict"],
        [[name, str(value), "met" if ok else "missed"] for name, value, ok in checks],
    )
