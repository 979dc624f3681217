"""Every busy policy under a real prefork worker whose broker, results and locks all go through Redis Sentinel.

The worker (:class:`support.sentinel.SentinelStack`, running
``tests/celery/sentinel_app.py``) has ``broker_url`` and ``result_backend``
set to the Sentinels' ``sentinel://`` URL, with ``master_name`` in
``broker_transport_options`` and ``result_backend_transport_options``.  Its
lock address is either derived from the broker (``dlock_redis_url`` unset)
or set explicitly (``dlock_redis_url`` with ``dlock_sentinel_master``): each
policy runs under both.  ``celery dlock list`` and ``doctor`` run in-process
on the client app, whose lock address is derived from its Sentinel broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery, states
from celery.bin.base import CLIContext
from celery.result import AsyncResult
from click.testing import CliRunner, Result
from support.results import collect_results
from support.sentinel import ENV_LOCK_SOURCE, SentinelStack, SentinelTopology
from support.worker_stack import new_key
from test_handoff_worker import assert_ran_once_in_turn, flag_set_on_exit, start_holder, wait_parked

from celery_dlock import LockBusy, TaskSkipped
from celery_dlock.celery.app_state import locks_for
from celery_dlock.ops.cli import dlock
from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]


@pytest.fixture(scope="module", params=["broker", "explicit"])
def stack(request: pytest.FixtureRequest) -> Iterator[SentinelStack]:
    """A Sentinel topology and one prefork worker (concurrency 4) on it, the lock address as ``param`` says."""
    with SentinelTopology() as topology:
        made = SentinelStack.on(topology, request.param)
        try:
            made.worker(concurrency=4)
            yield made
        finally:
            collect_results()
            made.close()


def busy_count(stack: SentinelStack, task: str) -> int:
    """How many times ``task`` found its key held, as the counters say."""
    return locks_for(stack.app).redlock.stats().get(task, {}).get("busy", 0)


def wait_busy(stack: SentinelStack, task: str) -> None:
    """Wait until a duplicate of ``task`` has found its key held."""
    wait_until(lambda: busy_count(stack, task) >= 1, 15, message=lambda: f"{task} to find its key busy\n{stack.logs()}")


@contextmanager
def holding(stack: SentinelStack, policy: str, key: str) -> Iterator[tuple[AsyncResult, dict[str, Any]]]:
    """A run of ``sa.<policy>`` holding ``key`` for the block, and its run record; it succeeds after."""
    with flag_set_on_exit(stack, f"flag:{key}") as flag:
        holder, run_record = start_holder(stack, f"sa.{policy}", key, flag)
        yield holder, run_record
    assert stack.result(holder).state == states.SUCCESS


#: The setting each kind of worker takes its lock address from.
SOURCES = {"broker": "broker_url", "explicit": "dlock_redis_url"}


def test_the_worker_locks_through_the_sentinels(stack: SentinelStack) -> None:
    """The worker's lock lives on the Sentinels' master, at the address its settings give."""
    where = stack.result(stack.send("sa.lock_address")).result
    source = SOURCES[stack.env[ENV_LOCK_SOURCE]]
    assert where == {"source": source, "urls": [stack.broker.url], "sentinel_master": stack.broker.master_name}
    key = new_key("where")
    with holding(stack, "requeue", key) as (_, run_record):
        assert stack.lock_token(key) == run_record["token"] >= 1
    settings = locks_for(stack.app).settings  # the client app's: derived from its broker
    assert settings.redis_url == (stack.broker.url,) and settings.sentinel_master == stack.broker.master_name


def test_requeue(stack: SentinelStack) -> None:
    """The duplicate is requeued while the key is held, then runs once: two runs, two results."""
    key = new_key("requeue")
    with holding(stack, "requeue", key) as (holder, _):
        duplicate = stack.send("sa.requeue", key)
        wait_busy(stack, "sa.requeue")
    assert stack.result(duplicate).state == states.SUCCESS
    assert_ran_once_in_turn(stack, key, [holder.id, duplicate.id])
    assert stack.runs(task_id=duplicate.id)[0]["requeues"] >= 1


def test_skip(stack: SentinelStack) -> None:
    """The duplicate is dropped as TaskSkipped at once: one run."""
    key = new_key("skip")
    with holding(stack, "skip", key) as (holder, _):
        assert isinstance(stack.result(stack.send("sa.skip", key)).result, TaskSkipped)
    assert_ran_once_in_turn(stack, key, [holder.id])


def test_wait(stack: SentinelStack) -> None:
    """The duplicate blocks in the worker until the holder releases, then runs: two runs, in turn."""
    key = new_key("wait")
    with holding(stack, "wait", key) as (holder, _):
        duplicate = stack.send("sa.wait", key)
        wait_busy(stack, "sa.wait")
        assert stack.runs(task_id=duplicate.id) == []
    assert stack.result(duplicate).state == states.SUCCESS
    assert_ran_once_in_turn(stack, key, [holder.id, duplicate.id])


def test_raise(stack: SentinelStack) -> None:
    """The duplicate fails with LockBusy: one run."""
    key = new_key("raise")
    with holding(stack, "raise", key) as (holder, _):
        duplicate = stack.result(stack.send("sa.raise", key))
        assert duplicate.state == states.FAILURE and isinstance(duplicate.result, LockBusy)
    assert_ran_once_in_turn(stack, key, [holder.id])


def test_queue(stack: SentinelStack) -> None:
    """Three duplicates park in the key's queue on the master, then each runs once, in park order."""
    key = new_key("queue")
    with holding(stack, "queue", key) as (holder, _):
        sent = [stack.send("sa.queue", key) for _ in range(3)]
        parked = wait_parked(stack, key, 3)
    assert [stack.result(r).state for r in sent] == [states.SUCCESS] * 3
    assert sorted(parked) == sorted(r.id for r in sent)
    assert_ran_once_in_turn(stack, key, [holder.id, *parked])
    assert [run["id"] for run in stack.runs(key=key)] == [holder.id, *parked]


def test_coalesce(stack: SentinelStack) -> None:
    """Three duplicates fold into one more run, with the last one's arguments: two runs."""
    key = new_key("coalesce")
    with holding(stack, "coalesce", key) as (holder, _):
        carrier = stack.send("sa.coalesce", key, None, 1)  # (key, flag, n)
        assert wait_parked(stack, key, 1) == [carrier.id]
        for n in (2, 3):
            assert stack.result(stack.send("sa.coalesce", key, None, n)).result == {"coalesced_into": carrier.id}
    assert stack.result(carrier).result["n"] == 3
    assert stack.result(holder).result["n"] == 0
    assert_ran_once_in_turn(stack, key, [holder.id, carrier.id])


# -- celery dlock list and doctor ------------------------------------------------------------


def run(app: Celery, *args: str, code: int = 0) -> Result:
    """``celery dlock ARGS`` on ``app``, in-process; checks the exit code."""
    result = CliRunner().invoke(dlock, list(args), obj=CLIContext(app=app, no_color=True, workdir=None))
    assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return result


def verdicts(output: str) -> list[tuple[str, ...]]:
    """``(verdict, check name)`` for each line of the doctor's report."""
    return [tuple(line.split()[:2]) for line in output.splitlines()[:-1]]


def test_list_shows_a_lock_held_through_the_sentinels(stack: SentinelStack) -> None:
    key = new_key("listed")
    with holding(stack, "queue", key) as (holder, run_record):
        (entry,) = json.loads(run(stack.app, "list", f"{key}*", "--json").output)
        assert (entry["key"], entry["task_id"], entry["task"]) == (key, holder.id, "sa.queue")
        assert entry["token"] == run_record["token"] and entry["nodes"] == entry["of_nodes"] == 1
        shown = run(stack.app, "show", key).output
        assert f"task id   {holder.id}" in shown
    wait_until(lambda: not stack.lock_exists(key), 10, message=f"the lock of {key} to go")
    assert run(stack.app, "list", f"{key}*").output == f"no held locks match '{key}*'\n"


def sentinel_report(topology: SentinelTopology, replicas: int = 1) -> str:
    """What doctor says of the topology's master of now."""
    return f"Sentinel master {topology.master_name} at 127.0.0.1:{topology.master_port} with {replicas} replica(s)"


@pytest.mark.parametrize("source", ["broker", "explicit"])
def test_doctor_reports_the_sentinel_master_and_warns_of_failover(
    sentinel_topology: SentinelTopology, source: str
) -> None:
    topology = sentinel_topology
    app = Celery("doctor", set_as_current=False)
    if source == "broker":
        app.conf.update(broker_url=topology.url, broker_transport_options={"master_name": topology.master_name})
    else:
        app.conf.update(
            broker_url="memory://", dlock_redis_url=topology.url, dlock_sentinel_master=topology.master_name
        )
    output = run(app, "doctor").output
    assert verdicts(output) == [
        ("OK", "settings"),
        ("OK", "node"),
        ("WARN", "topology"),
        ("WARN", "persistence"),
        ("OK", "eviction"),
        ("OK", "task"),
    ]
    origin = "derived from broker_url" if source == "broker" else "set in dlock_redis_url"
    assert f"lock address {origin}: 1 node(s), quorum 1" in output
    assert f"{sentinel_report(topology)}: replication is asynchronous" in output
    report = json.loads(run(app, "doctor", "--json").output)
    assert report["verdict"] == "WARN"


def test_doctor_follows_a_failover(sentinel_topology: SentinelTopology) -> None:
    """Right after the switch, doctor finds the new master, which has no replica yet."""
    topology = sentinel_topology
    app = Celery("doctor", set_as_current=False)
    app.conf.update(broker_url="memory://", dlock_redis_url=topology.url, dlock_sentinel_master=topology.master_name)
    before = sentinel_report(topology)
    assert before in run(app, "doctor").output
    topology.failover()
    assert sentinel_report(topology, replicas=0) in run(app, "doctor").output
