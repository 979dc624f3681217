#!/usr/bin/env python3
"""Run the beat demo: two ``celery beat`` processes, one worker, one line per tick.

    python examples/beat/run.py [--seconds 15] [--beats 2]

It starts a throwaway ``redis-server`` on a free loopback port, a real
``celery worker`` and ``--beats`` instances of ``celery beat`` with
``celery_dlock.beat:MultiBeatScheduler``, all in one working directory (so the
beats also share the default schedule file name).  The only entry is due
every second; its job appends a line to a log file.  After ``--seconds`` it
stops the beats, lets the worker finish, stops everything, prints the log and
what each beat did, and exits 0 only if the log has exactly one line per tick:
no tick twice, none missing between the first and the last.

The redis-server launcher is shared with the ledger demo (``examples/processes.py``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/, for the shared process helpers

import processes  # noqa: E402

SCHEDULER = "celery_dlock.beat:MultiBeatScheduler"
SENT = re.compile(r"Sending due task append-line \(\S+\) for (\S+)")
TAKEN = re.compile(r"append-line for (\S+) already claimed by")


class Child:
    """``python -m celery -A tasks ...`` in the demo's directory, logging to a file."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        command = [sys.executable, "-m", "celery", "-A", "tasks", *args]
        self.proc = processes.spawn(command, self.log, cwd=workdir, env=env)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not log {pattern!r}:\n{processes.tail(self.log)}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a beat saves its schedule file; a worker finishes its tasks), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        processes.kill_group(self.proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="how long the beats run (default 15)")
    parser.add_argument("--beats", type=int, default=2, help="how many beats to run (default 2)")
    args = parser.parse_args(argv)
    if args.seconds < 3 or args.beats < 1:
        parser.error("--seconds must be at least 3 and --beats at least 1")
    try:
        import celery_dlock.beat  # noqa: F401
    except ImportError as exc:
        sys.exit(f"error: {exc}; install the project first: pip install -e '.[test]'")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, processes.interrupt)
    atexit.register(processes.kill_children)

    wall = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="beat-demo-"))
    server = processes.RedisServer(workdir)
    children: list[Child] = []
    status, verdict = 1, "FAILED"
    try:
        status, verdict = demo(args, workdir, server, children)
    except RuntimeError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        verdict = "FAILED: the demo did not finish"
    except (KeyboardInterrupt, processes.Interrupted) as exc:
        signum = exc.args[0] if isinstance(exc, processes.Interrupted) else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name})", flush=True)
        status, verdict = 128 + signum, "stopped early"
    finally:
        for child in reversed(children):
            child.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    left = [child.name for child in children if child.proc.poll() is None] + (["redis-server"] if server.proc else [])
    remains = f"still running: {', '.join(left)}" if left else "nothing left running"
    print(f"{verdict} ({time.monotonic() - wall:.1f} s in all; {remains})")
    return status if not left else 1


def demo(args: argparse.Namespace, workdir: Path, server: Any, children: list[Child]) -> tuple[int, str]:
    """Start everything, let the beats run, stop everything, check the log."""
    server.start()
    print(f"redis-server {server.version} on {processes.HOST}:{server.port}")
    ticks_log = workdir / "ticks.log"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        BEAT_DEMO_BROKER_URL=server.url(0),
        BEAT_DEMO_LOCK_URL=server.url(1),
        BEAT_DEMO_LOG=str(ticks_log),
    )
    worker = Child("worker", [
        "worker", "-P", "prefork", "-c", "2", "-l", "INFO", "-n", f"beat-demo-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ], workdir, env)  # fmt: skip
    children.append(worker)
    worker.wait_for(r"@\S+ ready\.")
    print("celery worker ready")

    beats: list[Child] = []
    for number in range(1, args.beats + 1):
        if beats:
            time.sleep(0.5)  # started at different times, they agree on the ticks all the same
        beats.append(Child(f"beat{number}", ["beat", "-S", SCHEDULER, "-l", "INFO"], workdir, env))
        children.append(beats[-1])
    for beat in beats:
        schedule_file = beat.wait_for(r"beat: schedule file (\S+);").group(1)
        print(f"{beat.name} started: celery beat -S {SCHEDULER} (its schedule file: {schedule_file})")

    print(f"\nrunning for {args.seconds:g} s...")
    time.sleep(args.seconds)
    for beat in beats:
        beat.stop()
    sent = {beat.name: SENT.findall(beat.text()) for beat in beats}
    all_sent = [tick for ticks in sent.values() for tick in ticks]
    deadline = time.monotonic() + 15
    while len(_lines(ticks_log)) < len(all_sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a tick published twice would have run by now too
    worker.stop()
    server.stop()

    lines = _lines(ticks_log)
    print(f"\n{ticks_log.name}:")
    for line in lines:
        print(f"  {line}")
    print()
    for beat in beats:
        taken = TAKEN.findall(beat.text())
        print(f"{beat.name}: published {len(sent[beat.name])} ticks, found {len(taken)} already claimed")
    status, problems = _check(lines, all_sent)
    for problem in problems:
        print(f"  {problem}")
    if status:
        return status, "FAILED: the log is not one line per tick"
    return 0, f"OK: {len(lines)} ticks, one line each"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _check(lines: list[str], sent: list[str]) -> tuple[int, list[str]]:
    """One line per tick: no tick twice, no gap, and one line per publish."""
    ticks = [line.split()[0] for line in lines]
    problems = []
    twice = [tick for tick, n in Counter(ticks).items() if n > 1]
    if twice:
        problems.append(f"ticks that ran more than once: {twice}")
    seconds = sorted({_seconds(tick) for tick in ticks})
    gaps = [(a, b) for a, b in itertools.pairwise(seconds) if b - a != 1]
    if gaps:
        problems.append(f"ticks missing between: {gaps}")
    if len(sent) != len(set(sent)) or sorted(sent) != sorted(ticks):
        problems.append("the beats' publishes do not match the log")
    if len(ticks) < 3:
        problems.append("fewer than 3 ticks ran")
    return (1 if problems else 0), problems


def _seconds(tick: str) -> int:
    return int(datetime.strptime(tick, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())


if __name__ == "__main__":
    sys.exit(main())
