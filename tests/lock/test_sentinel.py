"""The lock core through Redis Sentinel: a master, its replica and three Sentinels, all real processes.

The node is ``sentinel://h:p1;sentinel://h:p2;sentinel://h:p3`` with
``sentinel_master=`` (see :mod:`support.sentinel`).  The failover test runs
the fault harness's holder processes, recorder and checker
(``tests/faults``) through one ``SENTINEL FAILOVER``; what it measures is
printed (run with ``-s``).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redis.sentinel import Sentinel
from support.critical_sections import COUNTER, read_sections, run_sections
from support.paths import TESTS_DIR
from support.redis_servers import RedisServer
from support.sentinel import SentinelTopology
from support.stored import stored_owner

from celery_dlock import LockBusy, Redlock
from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.polling import wait_until

# The fault harness's modules import one another by name, from their own directory.
sys.path.insert(0, str(TESTS_DIR / "faults"))
from fault_harness import BASE_SEED, Scenario, Timing, now_ns, running

pytestmark = [pytest.mark.timeout(90)]

LOCK = "dlock:lock:{}"


def redlock_of(topology: SentinelTopology) -> Redlock:
    return Redlock([topology.url], sentinel_master=topology.master_name)


# -- the basics ------------------------------------------------------------------


def test_acquire_extend_holder_and_release_through_the_sentinels(sentinel_topology: SentinelTopology) -> None:
    topology = sentinel_topology
    redlock = redlock_of(topology)
    (node,) = redlock.nodes
    sentinels = ",".join(sorted(f"127.0.0.1:{sentinel.port}" for sentinel in topology.sentinels))
    assert node.name == f"sentinel://{sentinels}/{topology.master_name}"
    assert redlock.quorum == 1
    master = topology.master_client()
    (replica,) = [server.client() for server in topology.replicas]

    lock = redlock.acquire("job", ttl=5, label="lbl")
    assert stored_owner(master, LOCK.format("job")) == lock.owner
    assert 4000 < master.pttl(LOCK.format("job")) <= 5000
    # It is the master's: the replica has it only by replication.
    wait_until(lambda: stored_owner(replica, LOCK.format("job")) == lock.owner, 5, message="replication")
    holder = redlock.holder("job")
    assert holder is not None and holder["token"] == lock.token and holder["label"] == "lbl"
    with pytest.raises(LockBusy):
        redlock.acquire("job", ttl=5, blocking=False)

    lock.extend(10)
    assert lock.extensions == 1 and lock.remaining() > 9
    assert 9000 < master.pttl(LOCK.format("job")) <= 10_000

    assert lock.release() is True
    assert not master.exists(LOCK.format("job"))
    assert redlock.holder("job") is None
    wait_until(lambda: not replica.exists(LOCK.format("job")), 5, message="the release to replicate")
    again = redlock.acquire("job", ttl=5, blocking=False)
    assert again.token > lock.token
    assert again.release() is True
    redlock.close()


def test_threads_exclude_each_other_through_the_sentinels(
    sentinel_topology: SentinelTopology, redis_server: RedisServer
) -> None:
    """6 threads x 15 sections through a ``Sentinel.master_for`` client, the other way to name the node.

    Every section runs, none overlaps another, no update is lost, and the
    90 tokens are distinct, rising in the order the sections started.
    """
    topology = sentinel_topology
    addresses = [("127.0.0.1", sentinel.port) for sentinel in topology.sentinels]
    client = Sentinel(addresses, socket_timeout=1).master_for(topology.master_name)  # type: ignore[no-untyped-call]
    threads, rounds = 6, 15
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(lambda _: run_sections([client], redis_server.url, "shared", rounds), range(threads)))
    assert done == [rounds] * threads
    recorder = redis_server.client()
    sections = read_sections(recorder)
    assert len(sections) == threads * rounds
    assert overlaps(sections) == []
    assert int(recorder.get(COUNTER)) == threads * rounds, "a lost update means two holders at once"
    assert falling_tokens(sections) == []
    assert len({section.token for section in sections}) == threads * rounds
    client.close()


# -- SENTINEL FAILOVER under load ------------------------------------------------------

#: The longest the lock may stop granting, around a failover, for the test to pass.
AVAILABILITY_BOUND = 10.0
#: Holder processes contending for one key, each section ~10 ms (the harness's default).
HOLDERS = 3
#: Sections the holders must complete on the new master, after the switch.
AFTER_SWITCH = 50


def test_sentinel_failover_under_a_loop_of_holders(sentinel_topology: SentinelTopology, tmp_path: Path) -> None:
    """Holders lock one key in a loop through ``SENTINEL FAILOVER``; a fenced store takes their writes.

    Asserted: the lock never stops granting for longer than
    ``AVAILABILITY_BOUND``, the holders carry on on the new master, the
    fenced store accepted no write out of order, no two sections whose
    writes it accepted overlapped, and no later section got a lower token
    (the promoted replica's counter may lag, the clock floor does not).  Measured and printed: how long the
    switch and the demotion of the old master took, the longest gap between
    sections, and what a client without fencing saw (overlaps, lost
    updates) and the token inversions.

    The old master stays a master, and keeps its clients, until the Sentinels
    turn it into a replica some ten seconds after the switch; whatever it
    grants meanwhile is lost then, the fencing counter's rise included.  The
    test shows that with a probe lock taken in that window: after the
    demotion the new master grants it again at once (the tokens of both are
    printed).
    """
    topology = sentinel_topology
    scenario = Scenario("sentinel-failover", tmp_path, BASE_SEED)
    timing = Timing()
    probe_locks = redlock_of(topology)
    probe_locks.acquire("probe", ttl=30).release()  # connected to the master before the failover
    old_master = topology.master_client()
    try:
        with running(scenario):
            options = {"sentinel_master": topology.master_name}
            scenario.spawn_many(topology, HOLDERS, timing, redlock_options=options)  # type: ignore[arg-type]
            scenario.wait_progress(30, timeout=30)
            started = scenario.faults.add("sentinel-failover")
            switch = topology.failover()
            new_master = topology.master_client()
            probe = probe_locks.acquire("probe", ttl=30, blocking=False)
            assert old_master.exists(LOCK.format("probe")) and not new_master.exists(LOCK.format("probe"))
            topology.wait_settled(timeout=30)
            settled = now_ns()
            twice = redlock_of(topology).acquire("probe", ttl=30, blocking=False)
            scenario.wait_progress(AFTER_SWITCH, timeout=30)
            scenario.stop_holders()
        verdict = scenario.verdict("sentinel-failover")
        history = scenario.history()

        # The probe's lock, granted by the old master after the switch and
        # valid for 30 s, was granted again as soon as the old master was demoted.
        assert probe.remaining() > 0 and not probe.lost
        assert probe.release() is False

        longest_gap = history.longest_gap_after(started)
        after_switch = [entry for entry in history.entered if entry["enter"] > settled]
        fell_back = history.tokens_fell_back(settled, settled)
        print(
            f"\nSentinel failover: switched in {switch:.2f}s, old master demoted {(settled - started) / 1e9:.2f}s "
            f"after SENTINEL FAILOVER; longest gap between sections {longest_gap * 1000:.0f} ms "
            f"(bound {AVAILABILITY_BOUND:g}s); {verdict.summary()}; tokens fell back by {fell_back} at the "
            f"demotion; probe token {probe.token}, granted again after the demotion with token {twice.token}"
        )
        assert longest_gap <= AVAILABILITY_BOUND, scenario.explain(f"the lock stopped for {longest_gap:.2f}s")
        assert len(after_switch) >= AFTER_SWITCH
        assert verdict.fenced_violations == 0, scenario.explain("the fenced store took a write out of order")
        assert overlaps(history.accepted_sections()) == [], scenario.explain("two accepted sections overlapped")
        # The new master's counter lags the old one's, but every grant is raised to its clock floor.
        assert verdict.token_inversions == 0, scenario.explain("a later section got a lower token")
        assert fell_back == 0 and twice.token > probe.token, (fell_back, probe.token, twice.token)
        twice.release()
    finally:
        scenario.close()
        probe_locks.close()
