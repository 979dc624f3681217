"""``celery dlock``: the subcommands against real redis-servers and a real worker.

Most tests invoke the ``dlock`` click group in-process, with the context
object Celery's own ``celery`` command would give it; one goes through the
installed ``celery`` program, which proves the entry-point registration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from support.cli import run_dlock as run
from support.redis_servers import RedisServer
from support.stored import stored_owner

from celery_dlock import Redlock, single_flight
from celery_dlock.ops.cli import EVENTS
from celery_dlock.ops.inspect import lock_details, parked_tickets
from celery_dlock.testing.plugin import assert_skipped
from celery_dlock.testing.polling import wait_until

UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture
def redlock(lock_server: RedisServer) -> Iterator[Redlock]:
    """A lock manager of the test's own, as another worker would hold locks."""
    manager = Redlock(lock_server.url)
    yield manager
    manager.close()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Task bodies block on it until the test sets it (the worker runs threads)."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def tasks(celery_app: Celery, gate: threading.Event) -> SimpleNamespace:
    """Single-flight tasks whose first run holds its key until the gate opens."""

    @celery_app.task(shared=False)
    @single_flight(key="ledger:{account}", on_busy="queue")
    def charge(account: str, wait: bool = False) -> str:
        if wait:
            gate.wait(20)
        return account

    @celery_app.task(shared=False)
    @single_flight(key="report:{day}", on_busy="skip")
    def report(day: str, wait: bool = False) -> str:
        if wait:
            gate.wait(20)
        return day

    return SimpleNamespace(charge=charge, report=report)


def hold_with_parked(app: Celery, charge: Any, parked: int) -> tuple[Any, list[Any]]:
    """Start a run that holds ``ledger:acct-1``, then park ``parked`` duplicates behind it."""
    holder = charge.delay("acct-1", wait=True)
    wait_until(lambda: lock_details(app, "ledger:acct-1"))
    duplicates = [charge.delay("acct-1") for _ in range(parked)]
    wait_until(lambda: len(parked_tickets(app, "ledger:acct-1")) == parked)
    return holder, duplicates


# -- list and show ----------------------------------------------------------------------


def test_list_and_show_a_held_lock_and_its_queue(tasks, celery_app, celery_worker, lock_server, gate) -> None:
    holder, parked = hold_with_parked(celery_app, tasks.charge, parked=2)
    owner = stored_owner(lock_server.client(), "dlock:lock:ledger:acct-1")

    listed = run(celery_app, "list").output
    header, row = listed.splitlines()
    assert header.split() == ["KEY", "KIND", "TASK", "TASK", "ID", "HOST", "PID", "TOKEN", "TTL", "HELD"]
    key, kind, task, task_id, _host, pid, token, ttl, held = row.split()
    assert (key, kind, task, task_id, pid) == ("ledger:acct-1", "run", tasks.charge.name, holder.id, str(os.getpid()))
    assert int(token) >= 1 and ttl.endswith("s") and held.endswith("s")
    assert run(celery_app, "list", "report:*").output == "no held locks match 'report:*'\n"

    shown = run(celery_app, "show", "ledger:acct-1").output
    assert f"task id   {holder.id}" in shown
    assert "handoff   no" in shown
    assert f"parked: 2 message(s), next first\n  1. {parked[0].id}  {tasks.charge.name}\n  2. {parked[1].id}" in shown
    assert owner not in listed + shown, "the owner value is a secret"

    (entry,) = json.loads(run(celery_app, "list", "--json").output)
    assert entry["key"] == "ledger:acct-1" and entry["task_id"] == holder.id and entry["pid"] == os.getpid()
    assert entry["reserved_for"] is None and entry["nodes"] == entry["of_nodes"] == 1
    assert 0 < entry["ttl_left"] <= 30 and entry["held_for"] >= 0
    full = json.loads(run(celery_app, "show", "ledger:acct-1", "--json").output)
    assert full["lock"]["token"] == entry["token"]
    assert [p["ticket"] for p in full["parked"]] == [p.id for p in parked]
    assert owner not in json.dumps(full)

    gate.set()
    assert [r.get(timeout=20) for r in [holder, *parked]] == ["acct-1"] * 3
    assert run(celery_app, "show", "ledger:acct-1", code=1).output == "lock 'ledger:acct-1' is not held\n"


def test_show_a_handoff_reservation(celery_app: Celery, lock_server: RedisServer) -> None:
    from celery_dlock.celery.app_state import locks_for

    queue = locks_for(celery_app).handoff_queue
    holder = queue.acquire("k", ttl=30)
    queue.park("k", "ticket-1", json.dumps({"task": "proj.charge"}).encode(), max_queued=10)
    holder.release()  # reserved for ticket-1; nobody publishes it here

    (entry,) = json.loads(run(celery_app, "list", "--json").output)
    assert (entry["reserved_for"], entry["task"], entry["task_id"]) == ("ticket-1", "proj.charge", "ticket-1")
    assert "ticket-1 (handoff)" in run(celery_app, "list").output
    assert "handoff   yes, for parked ticket ticket-1" in run(celery_app, "show", "k").output


def test_show_lists_the_permit_holders_of_a_semaphore(celery_app: Celery, redlock: Redlock) -> None:
    details = {"task": "proj.call_api"}
    permits = [redlock.acquire("api", ttl=30, limit=3, label=f"job-{i}", details=details) for i in range(2)]

    header, *rows = run(celery_app, "show", "api").output.splitlines()[1:]
    assert header.split() == ["TASK", "TASK", "ID", "HOST", "PID", "TOKEN", "TTL", "HELD"]
    assert [row.split()[:2] for row in rows] == [["proj.call_api", "job-0"], ["proj.call_api", "job-1"]]
    assert [int(row.split()[4]) for row in rows] == [p.token for p in permits]
    shown = json.loads(run(celery_app, "show", "api", "--json").output)
    assert shown["lock"] is None and [p["label"] for p in shown["permits"]] == ["job-0", "job-1"]
    assert all(0 < p["ttl"] <= 30 for p in shown["permits"])

    for permit in permits:
        permit.release()
    assert run(celery_app, "show", "api", code=1).output == "lock 'api' is not held\n"


# -- release and purge ----------------------------------------------------------------------


def test_release_asks_first_and_declining_removes_nothing(celery_app: Celery, redlock: Redlock) -> None:
    lock = redlock.acquire("stuck", ttl=30, label="job-7")
    declined = run(celery_app, "release", "stuck", input="n\n", code=1)
    assert "Force-release 1 lock(s)?" in declined.output and "Aborted!" in declined.output
    assert lock_details(celery_app, "stuck") is not None

    accepted = run(celery_app, "release", "stuck", input="y\n")
    assert f"released 'stuck': token {lock.token}, held by job-7 on" in accepted.output
    assert lock_details(celery_app, "stuck") is None
    assert not lock.release(), "the holder finds its lock gone"


def test_release_yes_and_a_key_not_held(celery_app: Celery, redlock: Redlock) -> None:
    redlock.acquire("stuck", ttl=30)
    result = run(celery_app, "release", "stuck", "--yes")
    assert "released 'stuck'" in result.output and "[y/N]" not in result.output
    assert run(celery_app, "release", "stuck", "--yes", code=1).stderr == "lock 'stuck' is not held\n"


def test_release_hands_the_key_to_its_parked_messages(tasks, celery_app, celery_worker, gate) -> None:
    holder, (parked,) = hold_with_parked(celery_app, tasks.charge, parked=1)
    result = run(celery_app, "release", "ledger:acct-1", "--yes")
    assert "released 'ledger:acct-1': token" in result.output
    assert f"handed on parked message {parked.id} of 'ledger:acct-1'" in result.output
    assert parked.get(timeout=10) == "acct-1", "the parked message ran while the old holder still waits"
    assert not holder.ready()
    gate.set()
    assert holder.get(timeout=10) == "acct-1"


def test_purge_by_prefix(celery_app: Celery, redlock: Redlock) -> None:
    for key in ("batch:1", "batch:2", "batchy", "other:1", "we[ird]:1"):
        redlock.acquire(key, ttl=30)

    declined = run(celery_app, "purge", "--prefix", "batch:", input="n\n", code=1)
    assert "batch:1" in declined.output and "batch:2" in declined.output and "other" not in declined.output
    assert lock_details(celery_app, "batch:1") is not None

    result = run(celery_app, "purge", "--prefix", "batch:", "--yes")
    assert "released 'batch:1'" in result.output and "released 'batch:2'" in result.output
    assert result.output.endswith("released 2 lock(s)\n")
    assert all(lock_details(celery_app, key) for key in ("batchy", "other:1")), "other keys stay held"

    assert "released 'we[ird]:1'" in run(celery_app, "purge", "--prefix", "we[", "--yes").output
    assert run(celery_app, "purge", "--prefix", "nothing", "--yes").output == "no held locks start with 'nothing'\n"
    assert "must not be empty" in run(celery_app, "purge", "--prefix", "", code=2).output


# -- stats ---------------------------------------------------------------------------------------


def test_stats_after_real_runs(tasks, celery_app, celery_worker, gate) -> None:
    first = tasks.report.delay("mon", wait=True)
    wait_until(lambda: lock_details(celery_app, "report:mon"))
    assert_skipped(tasks.report.delay("mon"))
    gate.set()
    assert first.get(timeout=10) == "mon"
    assert tasks.report.delay("tue").get(timeout=10) == "tue"

    counters = json.loads(run(celery_app, "stats", "--json").output)
    assert counters[tasks.report.name] == {
        "acquired": 2,
        "busy": 1,
        "requeued": 0,
        "skipped": 1,
        "lost": 0,
        "released": 2,
        "parked": 0,
        "coalesced": 0,
    }
    header, row = run(celery_app, "stats").output.splitlines()
    assert header.split() == ["TASK", *(event.upper() for event in EVENTS)]
    assert row.split() == [tasks.report.name, "2", "1", "0", "1", "0", "2", "0", "0"]


def test_stats_with_nothing_counted(celery_app: Celery, lock_server: RedisServer) -> None:
    assert run(celery_app, "stats").output == "no counters yet\n"


def test_an_unreachable_lock_service_is_a_clean_exit(celery_app: Celery) -> None:
    celery_app.conf.dlock_redis_url = UNREACHABLE
    result = run(celery_app, "list", code=69)
    assert "the lock service cannot be reached" in result.output and "Traceback" not in result.output


# -- doctor ----------------------------------------------------------------------------------------


def doctor_app(lock_urls: str | list[str], broker: str = "memory://", **conf: Any) -> Celery:
    """An app with one single-flight task, its locks on ``lock_urls``."""
    app = Celery("doctor", set_as_current=False)
    app.conf.update(broker_url=broker, dlock_redis_url=lock_urls, **conf)

    @app.task(shared=False, name="proj.charge")
    @single_flight(key="ledger:{account}", ttl=20)
    def charge(account: str) -> None: ...

    return app


def verdicts(output: str) -> list[tuple[str, str]]:
    """``(verdict, check name)`` for each line of the doctor's report."""
    return [tuple(line.split()[:2]) for line in output.splitlines()[:-1]]  # type: ignore[misc]


@pytest.fixture
def durable_server() -> Iterator[RedisServer]:
    """A node that syncs every write to disk and never evicts."""
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


def test_doctor_ok_on_a_good_node(durable_server: RedisServer, redis_server: RedisServer) -> None:
    app = doctor_app(durable_server.url, broker=redis_server.url)
    result = run(app, "doctor")
    assert verdicts(result.output) == [
        ("OK", "settings"),
        ("OK", "node"),
        ("OK", "topology"),
        ("OK", "persistence"),
        ("OK", "eviction"),
        ("OK", "task"),
    ]
    assert f"{durable_server.url}: standalone master with 0 replica(s)" in result.output
    assert "appendonly=yes appendfsync=always" in result.output
    assert "proj.charge: on_busy=requeue ttl=20s requeue_max_delay=60s visibility_timeout=3600s" in result.output
    assert result.output.endswith("6 ok, 0 warning(s), 0 failure(s)\n")
    report = json.loads(run(app, "doctor", "--json").output)
    assert report["verdict"] == "OK" and len(report["checks"]) == 6


def test_doctor_warns_when_appendfsync_is_not_always(redis_server: RedisServer) -> None:
    result = run(doctor_app(redis_server.url), "doctor")
    assert ("WARN", "persistence") in verdicts(result.output)
    assert "a crash-restart can forget held locks; delay restarts past the longest lease (30s)" in result.output
    assert "(the broker has no visibility timeout)" in result.output


def test_doctor_fails_on_eviction_and_an_unreachable_node(redis_nodes) -> None:
    (evicting,) = redis_nodes(1, ["--maxmemory-policy", "allkeys-lru"])
    result = run(doctor_app([evicting.url, UNREACHABLE]), "doctor", code=1)
    assert verdicts(result.output) == [
        ("WARN", "settings"),
        ("OK", "node"),
        ("OK", "topology"),
        ("WARN", "persistence"),
        ("FAIL", "eviction"),
        ("FAIL", "node"),
        ("OK", "task"),
    ]
    assert "2 nodes tolerate 0 failure(s), as 1 would" in result.output
    assert "maxmemory-policy=allkeys-lru" in result.output
    assert f"{UNREACHABLE}: unreachable" in result.output
    report = json.loads(run(doctor_app([evicting.url, UNREACHABLE]), "doctor", "--json", code=1).output)
    assert report["verdict"] == "FAIL"


def test_doctor_fails_on_bad_settings(redis_server: RedisServer) -> None:
    result = run(doctor_app(redis_server.url, dlock_on_busy="sometimes"), "doctor", code=1)
    assert verdicts(result.output) == [("FAIL", "settings")]
    assert "dlock_on_busy: expected one of" in result.output
    twice = run(doctor_app([redis_server.url, redis_server.url.replace("127.0.0.1", "localhost")]), "doctor", code=1)
    assert "is given twice" in twice.output


def test_doctor_fails_a_requeue_delay_past_the_visibility_timeout(redis_server: RedisServer) -> None:
    app = doctor_app(
        redis_server.url,
        broker=redis_server.url,
        dlock_requeue_max_delay=120,
        broker_transport_options={"visibility_timeout": 60},
    )
    result = run(app, "doctor", code=1)
    assert ("FAIL", "task") in verdicts(result.output)
    assert "a requeued message would be delivered twice" in result.output


def test_doctor_warns_a_lease_past_the_visibility_timeout(redis_server: RedisServer) -> None:
    app = doctor_app(
        redis_server.url,
        broker=redis_server.url,
        dlock_requeue_max_delay=5,
        broker_transport_options={"visibility_timeout": 15},
    )
    result = run(app, "doctor")
    assert ("WARN", "task") in verdicts(result.output)
    assert "ttl=20s requeue_max_delay=5s visibility_timeout=15s: a message redelivered" in result.output


# -- through the installed celery program --------------------------------------------------------


APP_MODULE = """
    import os
    from celery import Celery
    from celery_dlock import single_flight

    app = Celery("cliapp", broker="memory://")
    app.conf.dlock_redis_url = os.environ["LOCK_URL"]

    @app.task(name="cliapp.sync")
    @single_flight(key="sync:{n}")
    def sync(n):
        return n
"""


def test_the_celery_program_finds_the_dlock_command(tmp_path: Path, lock_server: RedisServer, redlock: Redlock) -> None:
    (tmp_path / "cliapp.py").write_text(textwrap.dedent(APP_MODULE))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LOCK_URL": lock_server.url}

    def celery(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "cliapp", "dlock", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    lock = redlock.acquire("sync:1", ttl=30, label="job-1")
    listed = celery("list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (entry["key"], entry["task_id"], entry["token"]) == ("sync:1", "job-1", lock.token)

    doctor = celery("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "OK    task         cliapp.sync: on_busy=requeue" in doctor.stdout

    released = celery("release", "sync:1", "--yes")
    assert released.returncode == 0 and "released 'sync:1'" in released.stdout
    assert "forced release of lock 'sync:1'" in released.stderr, "the core logs a WARNING"
