"""The lock core on a Redis Cluster: three masters and a replica of each, all real processes.

The node is ``redis+cluster://127.0.0.1:<port>`` (see :mod:`support.cluster`).
Each key's lock, queue and fencing counter share a hash tag, so every script
runs on the one master of that slot; these tests check where the keys land,
that a resharded slot takes its fencing counter along (``MOVED`` and
``ASK`` followed), and what a failover of the slot's master costs.  The
failover tests run the fault harness's holder processes and checker
(``tests/faults``); what they measure is printed (run with ``-s``).
"""

from __future__ import annotations

import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from support.cluster import ClusterTopology
from support.critical_sections import COUNTER, read_sections, run_sections
from support.paths import TESTS_DIR
from support.redis_servers import RedisServer
from support.stored import stored_owner

from celery_dlock import LockBusy, LockUnavailable, Redlock
from celery_dlock.lock.keyspace import key_slot
from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.redis_process import RedisProcess

sys.path.insert(0, str(TESTS_DIR / "faults"))
from fault_harness import BASE_SEED, Scenario, Timing, now_ns, running

pytestmark = [pytest.mark.timeout(90)]


def master_client(cluster: ClusterTopology, name: str) -> redis.Redis:
    """A plain client of the master that owns the key ``name``."""
    return cluster.master_for_key(name).client()


# -- the basics ------------------------------------------------------------------


def test_a_lock_and_its_counter_live_on_the_master_of_their_slot(clean_redis_cluster: ClusterTopology) -> None:
    cluster = clean_redis_cluster
    redlock = Redlock(cluster.url)
    (node,) = redlock.nodes
    assert node.name.startswith("redis+cluster://127.0.0.1:") and redlock.quorum == 1
    space = redlock.keyspace
    assert space.clustered

    lock = redlock.acquire("ledger:42", ttl=5, label="lbl")
    name = space.lock("ledger:42")
    assert key_slot(name) == key_slot(space.fence("ledger:42")) == key_slot(space.queue("ledger:42"))
    owner = master_client(cluster, name)
    assert stored_owner(owner, name) == lock.owner
    assert int(owner.get(space.fence("ledger:42"))) == lock.token
    holder = redlock.holder("ledger:42")
    assert holder is not None and holder["token"] == lock.token and holder["label"] == "lbl"
    with pytest.raises(LockBusy):
        redlock.acquire("ledger:42", ttl=5, blocking=False)
    lock.extend(10)
    assert 9000 < owner.pttl(name) <= 10_000
    assert lock.release() is True
    assert not owner.exists(name)
    again = redlock.acquire("ledger:42", ttl=5, blocking=False)
    assert again.token > lock.token
    assert int(owner.get(space.fence("ledger:42"))) == again.token
    again.release()
    redlock.close()


def test_keys_spread_over_every_master_and_count_tokens_per_tag(clean_redis_cluster: ClusterTopology) -> None:
    """A Cluster shares the load: 60 keys land on all three masters, each key's tokens rising from 1."""
    cluster = clean_redis_cluster
    redlock = Redlock(cluster.url)
    owners: set[int] = set()
    for number in range(60):
        key = f"job:{number}"
        first = redlock.acquire(key, ttl=5, blocking=False)
        first.release()
        second = redlock.acquire(key, ttl=5, blocking=False)
        second.release()
        assert second.token > first.token
        owners.add(cluster.master_for_key(redlock.keyspace.lock(key)).port)
    assert len(owners) == 3
    (node,) = redlock.nodes
    assert len(node.masters()) == 3  # type: ignore[attr-defined]


def test_threads_exclude_each_other_on_a_cluster(
    clean_redis_cluster: ClusterTopology, redis_server: RedisServer
) -> None:
    """6 threads x 15 sections on one key: none overlaps, no update is lost, 90 distinct tokens rise in order."""
    threads, rounds = 6, 15
    with ThreadPoolExecutor(threads) as pool:
        url = clean_redis_cluster.url
        done = list(pool.map(lambda _: run_sections([url], redis_server.url, "shared", rounds), range(threads)))
    assert done == [rounds] * threads
    recorder = redis_server.client()
    sections = read_sections(recorder)
    assert overlaps(sections) == []
    assert int(recorder.get(COUNTER)) == threads * rounds
    assert falling_tokens(sections) == []
    assert len({section.token for section in sections}) == threads * rounds


def test_a_resharded_slot_takes_its_locks_and_fencing_counter_along(clean_redis_cluster: ClusterTopology) -> None:
    """Mid-migration the source answers ``ASK``, afterwards ``MOVED``; both are followed, and tokens keep rising.

    The test moves the slot by hand, as ``redis-cli --cluster reshard`` does.
    """
    cluster = clean_redis_cluster
    redlock = Redlock(cluster.url)
    space = redlock.keyspace
    held = redlock.acquire("moving", ttl=30)
    slot = key_slot(space.lock("moving"))
    source = cluster.master_for_slot(slot)
    target = next(master for master in cluster.masters if master.port != source.port)

    migrate(cluster, slot, source, target, finish=False)
    # The slot's keys are on the target now, but the slot is not yet its: ASK.
    assert source.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert target.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= 2  # the lock and its counter
    # Read before any other acquire: a busy attempt spends a token too.
    assert importing_value(target, space.fence("moving")) == str(held.token), "the counter moved with the slot"
    with pytest.raises(LockBusy):
        redlock.acquire("moving", ttl=5, blocking=False)  # ASK followed: the target has the lock
    held.extend(30)
    assert held.release() is True
    # With the lock gone, the target refuses a script over keys it only partly has
    # (TRYAGAIN) until the slot is its: unavailable, which a blocking acquire rides out.
    with pytest.raises(LockUnavailable, match="TryAgain"):
        redlock.acquire("moving", ttl=5, blocking=False)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(redlock.acquire, "moving", 5, timeout=20)
        finish_migration(cluster, slot, target)
        after = waiting.result(timeout=30)
    assert after.token > held.token
    assert cluster.master_for_slot(slot).port == target.port
    assert stored_owner(target.client(), space.lock("moving")) == after.owner
    after.release()
    assert redlock.acquire("moving", ttl=5, blocking=False).token > after.token  # MOVED followed


def migrate(cluster: ClusterTopology, slot: int, source: RedisProcess, target: RedisProcess, *, finish: bool) -> None:
    """Move ``slot``'s keys from ``source`` to ``target`` as ``redis-cli --cluster reshard`` does."""
    source_client, target_client = source.client(), target.client()
    target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
    source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
    while keys := source_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source_client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        finish_migration(cluster, slot, target)


def importing_value(target: RedisProcess, name: str) -> str | None:
    """The string at ``name`` on ``target`` while its slot is still being imported (asked behind ``ASKING``)."""
    client = target.client(single_connection_client=True, decode_responses=True)
    client.execute_command("ASKING")
    value: str | None = client.get(name)
    client.close()
    return value


def finish_migration(cluster: ClusterTopology, slot: int, target: RedisProcess) -> None:
    """Give ``slot`` to ``target`` on every master, ending its migration."""
    for master in cluster.masters:
        master.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
    cluster.wait_settled()


# -- failover of the slot's master under load --------------------------------------------

#: The longest the lock may stop granting around a failover, for the tests to pass.
AVAILABILITY_BOUND = 10.0
#: Holder processes contending for one key.
HOLDERS = 3
#: The key every holder of the harness locks (``fault_holder.HolderSpec.key``).
HOLDER_KEY = "shared"
#: Sections the holders must complete after the switch.
AFTER_SWITCH = 50


@pytest.mark.parametrize("how", ["failover", "kill"])
def test_a_failover_of_the_slots_master_under_a_loop_of_holders(
    clean_redis_cluster: ClusterTopology, tmp_path: Path, how: str
) -> None:
    """Holders lock one key in a loop while its slot's master fails over, planned or killed.

    Asserted: the lock never stops granting for longer than
    ``AVAILABILITY_BOUND``, the holders carry on on the promoted replica, the
    fenced store accepted no write out of order, and no two sections it
    accepted overlapped.  Printed: the switch time, the longest gap, the
    unfenced client's view and how far the tokens fell back.  A planned
    ``CLUSTER FAILOVER`` waits for the replica to catch up, so nothing is
    lost; after a ``SIGKILL`` the replica may lack the newest grants, the
    "node forgets" case of ``docs/guarantees.md``.
    """
    cluster = clean_redis_cluster
    scenario = Scenario(f"cluster-{how}", tmp_path, BASE_SEED)
    slot = key_slot(Redlock(cluster.url).keyspace.lock(HOLDER_KEY))
    try:
        with running(scenario):
            nodes = types.SimpleNamespace(urls=[cluster.url])
            scenario.spawn_many(nodes, HOLDERS, Timing())  # type: ignore[arg-type]
            scenario.wait_progress(30, timeout=30)
            started = scenario.faults.add(how)
            begun = now_ns()
            cluster.failover(slot) if how == "failover" else cluster.kill_master(slot)
            switched = now_ns()
            scenario.wait_progress(AFTER_SWITCH, timeout=30)
            scenario.stop_holders()
        verdict = scenario.verdict(scenario.name)
        history = scenario.history()
        longest_gap = history.longest_gap_after(started)
        after = [entry for entry in history.entered if entry["enter"] > switched]
        print(
            f"\nCluster {how}: switched in {(switched - begun) / 1e9:.2f}s; longest gap between sections "
            f"{longest_gap * 1000:.0f} ms (bound {AVAILABILITY_BOUND:g}s); {verdict.summary()}; "
            f"tokens fell back by {history.tokens_fell_back(begun, switched)}"
        )
        assert longest_gap <= AVAILABILITY_BOUND, scenario.explain(f"the lock stopped for {longest_gap:.2f}s")
        assert len(after) >= AFTER_SWITCH
        assert verdict.fenced_violations == 0, scenario.explain("the fenced store took a write out of order")
        assert overlaps(history.accepted_sections()) == [], scenario.explain("two accepted sections overlapped")
        assert verdict.token_inversions == 0, scenario.explain("a later section got a lower token")
    finally:
        scenario.close()
