"""Every busy policy under a real prefork worker whose locks live on a real Redis Cluster.

The worker runs ``tests/celery/policy_app.py`` with ``dlock_redis_url`` set to
``redis+cluster://...`` (three masters, a replica each); its broker and
results are a plain redis-server, since kombu has no Cluster transport.  The
policy tests are :mod:`test_sentinel_worker`'s, run here on this module's
``stack``; ``celery dlock list`` and ``doctor`` run in-process on the client
app, which points at the same Cluster.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import pytest
from celery import states
from support.apps import HOLD_SECONDS
from support.cluster import ClusterTopology
from support.stored import stored_token
from support.worker_stack import Stack, new_key, stacks
from test_sentinel_worker import (  # noqa: F401 - collected here, on this module's stack
    holding,
    run,
    test_coalesce,
    test_queue,
    test_raise,
    test_requeue,
    test_skip,
    test_wait,
    verdicts,
)

from celery_dlock import TaskSkipped
from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.worker, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def stack(redis_cluster: ClusterTopology) -> Iterator[Stack]:
    """One prefork worker (concurrency 4) whose locks are on the module's Cluster."""
    with stacks() as make:
        made = make([redis_cluster.url])
        made.app.conf.dlock_redis_url = redis_cluster.url
        made.worker(concurrency=4, app_module="policy_app")
        yield made


def test_the_worker_locks_on_the_master_of_the_keys_slot(stack: Stack, redis_cluster: ClusterTopology) -> None:
    key = new_key("where")
    with holding(stack, "requeue", key) as (_, run_record):  # type: ignore[arg-type]
        name = stack.keyspace.lock(key)
        owner = redis_cluster.master_for_key(name).client()
        assert stored_token(owner, name) == run_record["token"] >= 1


def test_hold_keeps_the_key_on_the_cluster_until_its_period_ends(stack: Stack) -> None:
    """``hold=2``: the second call in one period is skipped; the key lives on as ``<key>@<period>``."""
    key = new_key("hold")
    period_start = (math.floor(time.time() / HOLD_SECONDS) + 1) * HOLD_SECONDS
    wait_until(lambda: time.time() >= period_start + 0.05, HOLD_SECONDS + 1, interval=0.01)
    first = stack.result(stack.send("sa.hold", key))
    second = stack.result(stack.send("sa.hold", key))
    assert time.time() < period_start + HOLD_SECONDS, "the test was too slow for its period"
    assert first.state == states.SUCCESS and isinstance(second.result, TaskSkipped), (first.result, second.result)
    assert stack.lock_exists(f"{key}@{int(period_start / HOLD_SECONDS)}"), "kept for the rest of the period"
    assert len(stack.runs(key=key)) == 1


def test_list_and_doctor_see_the_cluster(stack: Stack) -> None:
    key = new_key("listed")
    with holding(stack, "queue", key) as (holder, run_record):  # type: ignore[arg-type]
        (entry,) = json.loads(run(stack.app, "list", f"{key}*", "--json").output)
        assert (entry["key"], entry["task_id"], entry["token"]) == (key, holder.id, run_record["token"])
    wait_until(lambda: not stack.lock_exists(key), 10, message=f"the lock of {key} to go")
    output = run(stack.app, "doctor").output
    found = dict((name, verdict) for verdict, name, *_ in (line.split() for line in output.splitlines()[:-1]))
    assert found["node"] == "OK" and found["settings"] == "OK", output
    assert "Redis Cluster of 3 masters" in output, output
