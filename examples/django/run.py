#!/usr/bin/env python3
"""Run the Django demo: django-celery-beat's DatabaseScheduler, two beats, one tally per tick.

    python examples/django/run.py [--ticks 12] [--no-kill]

In a scratch directory, it migrates a fresh SQLite database, adds the periodic
task ``tick`` (``ticks.tick`` every second) with ``manage.py add_tick``, and
starts a throwaway ``redis-server``, a ``celery -A demo worker`` and two
``celery -A demo beat``.  The beats run ``celery_dlock.beat:ClaimingScheduler``
over django-celery-beat's ``DatabaseScheduler`` (``CELERY_BEAT_SCHEDULER`` and
``CELERY_DLOCK_BEAT_SCHEDULER`` in ``demo/settings.py``), sharing the one
database.  Half way through, the beat that sent the latest tick is killed
with SIGKILL (unless ``--no-kill``); the other carries on.  Once ``--ticks``
ticks have run it stops everything, prints the tally, and exits 0 only if
each tick between the first and the last ran exactly once and the ``tick``
row counts the runs published.

The processes are the package's test helpers (``celery_dlock.testing``),
which kill whatever is left when the script exits.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SENT = re.compile(r"Sending due task tick \(\S+\) for (\S+)")
TAKEN = re.compile(r"tick for (\S+) already claimed by")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=12, help="how many ticks to wait for (default 12)")
    parser.add_argument("--no-kill", action="store_true", help="do not kill a beat half way")
    args = parser.parse_args(argv)
    if args.ticks < 4:
        parser.error("--ticks must be at least 4")
    try:
        import django  # noqa: F401
        import django_celery_beat  # noqa: F401

        from celery_dlock.testing.polling import wait_until  # noqa: F401
    except ImportError as exc:
        sys.exit(f"error: {exc}; install the project first: pip install -e '.[test]'")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from celery_dlock.testing.process import remove_scratch_dir, scratch_dir
    from celery_dlock.testing.redis_process import RedisProcess

    started = time.monotonic()
    workdir = scratch_dir("django-demo-")
    try:
        with RedisProcess() as server:
            ok = demo(args, workdir, server.url.rsplit("/", 1)[0])
    finally:
        remove_scratch_dir(workdir)
    print(f"{'OK' if ok else 'FAILED'} ({time.monotonic() - started:.1f} s in all)")
    return 0 if ok else 1


def demo(args: argparse.Namespace, workdir: Path, redis_base: str) -> bool:
    import redis

    from celery_dlock.testing.polling import wait_until
    from celery_dlock.testing.process import ManagedProcess, python_environment
    from celery_dlock.testing.worker_process import WorkerProcess

    database = workdir / "db.sqlite3"
    env = python_environment(
        [HERE],
        {
            "DJANGO_SETTINGS_MODULE": "demo.settings",
            "DEMO_DATABASE": str(database),
            "DEMO_BROKER_URL": f"{redis_base}/0",
            "DEMO_LOCK_URL": f"{redis_base}/1",
            "DEMO_TALLY_URL": f"{redis_base}/2",
            "DEMO_TALLY_KEY": "ticks",
        },
    )
    print(f"redis-server on {redis_base}; SQLite database {database.name}")
    for command in (["migrate", "-v", "0"], ["add_tick", "--every", "1"]):
        done = subprocess.run([sys.executable, str(HERE / "manage.py"), *command], env=env, cwd=HERE, check=False)
        if done.returncode:
            print(f"manage.py {' '.join(command)} failed")
            return False

    worker = WorkerProcess("demo", concurrency=2, env=env, startup_timeout=60)
    beats = [
        ManagedProcess(
            [sys.executable, "-m", "celery", "-A", "demo", "beat", "-l", "INFO"],
            log_path=workdir / f"beat{n}.log",
            cwd=workdir,
            env=env,
            name=f"beat{n}",
        )
        for n in (1, 2)
    ]
    tally = redis.Redis.from_url(f"{redis_base}/2")
    try:
        worker.start()
        print("celery worker ready")
        for beat in beats:
            beat.start().wait_for_log(r"beat: \S+; claims on", timeout=60)
            print(f"{beat.name} started: celery -A demo beat ({type_line(beat.log)})")

        def ticks() -> set[str]:
            return {json.loads(raw)["slot"] for raw in tally.lrange("ticks", 0, -1)}

        killed: ManagedProcess | None = None
        if not args.no_kill:
            wait_until(lambda: len(ticks()) >= args.ticks // 2, args.ticks + 60, message="half of the ticks")
            time.sleep((0.5 - time.time()) % 1)  # to the middle of a second, between two ticks
            killed = max(beats, key=lambda beat: max(SENT.findall(beat.log), default=""))
            killed.kill()
            print(f"{killed.name} killed (SIGKILL) after {len(SENT.findall(killed.log))} ticks it sent")
        wait_until(lambda: len(ticks()) >= args.ticks, args.ticks + 60, message=f"{args.ticks} ticks")
        for beat in beats:
            beat.stop(timeout=15)
        sent = [slot for beat in beats for slot in SENT.findall(beat.log)]
        wait_until(lambda: set(sent) <= ticks(), 15, message="the worker to run every tick sent")
        time.sleep(0.5)  # a tick published twice would have run by now too
    finally:
        for beat in beats:
            beat.stop(timeout=15)
        worker.stop()
        worker.close()
    runs = [json.loads(raw) for raw in tally.lrange("ticks", 0, -1)]
    tally.close()
    return report(runs, beats, sent, killed, database)


def type_line(log: str) -> str:
    found = re.search(r"beat: (\S+); claims on", log)
    return found.group(1) if found else "?"


def report(runs: list[dict[str, Any]], beats: list[Any], sent: list[str], killed: Any, database: Path) -> bool:
    print("\ntally:")
    for run in runs:
        at = datetime.fromtimestamp(run["at"], timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        print(f"  {run['slot']} ran {at} worker-pid {run['pid']}")
    print()
    for beat in beats:
        state = " (killed)" if beat is killed else ""
        print(f"{beat.name}{state}: sent {len(SENT.findall(beat.log))}, found {len(TAKEN.findall(beat.log))} claimed")
    with sqlite3.connect(database) as db:
        count, last = db.execute(
            "SELECT total_run_count, last_run_at FROM django_celery_beat_periodictask WHERE name = 'tick'"
        ).fetchone()
    print(f"PeriodicTask 'tick': total_run_count {count}, last_run_at {last}")

    problems = []
    slots = Counter(run["slot"] for run in runs)
    twice = sorted(slot for slot, n in slots.items() if n > 1)
    if twice:
        problems.append(f"ticks that ran more than once: {twice}")
    seconds = sorted(_seconds(slot) for slot in slots)
    gaps = [(a, b) for a, b in itertools.pairwise(seconds) if b - a != 1]
    if gaps:
        problems.append(f"ticks missing between: {gaps}")
    if sorted(sent) != sorted(slots) or len(sent) != len(set(sent)):
        problems.append("the beats' sends do not match the tally")
    if count != len(sent):
        problems.append(f"total_run_count is {count}, but {len(sent)} runs were sent")
    for problem in problems:
        print(f"  {problem}")
    if not problems:
        print(f"{len(slots)} ticks, each ran once")
    return not problems


def _seconds(slot: str) -> int:
    return int(datetime.strptime(slot, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())


if __name__ == "__main__":
    sys.exit(main())
