"""Faults on the lock nodes: loss, wiped restarts, hangs, clock steps, a full outage.

Each test runs holder processes (:mod:`fault_holder`) on one key while it
injects faults through :class:`~fault_harness.Quorum`, then judges the
recorded history (:mod:`fault_checker`).  The expected results are the spec
of ``docs/guarantees.md``:

* with fencing, the fenced resource lets nothing stale through, under every
  fault here;
* without fencing, exclusion holds when nodes die, hang or all go down, as
  long as they come back with their data (fsync always) or after the ttl;
  it breaks when a node forgets a lock it granted (a wiped restart with no
  delay, a clock step), even one node when the lock lives on a bare
  majority, and those tests assert that it did break;
* after each fault heals the lock is taken again within
  :attr:`~fault_harness.Timing.liveness_bound`.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fault_harness import FSYNC_ALWAYS, VOLATILE, Quorum, Scenario, Timing, now_ns, running, soak
from fault_holder import Holder, run_section
from support.stored import stored_lock, stored_owner

from celery_dlock import LockBusy, LockUnavailable, Redlock
from celery_dlock.lock.metadata import lock_value
from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.multinode, pytest.mark.timeout(180)]

#: Redis's usual durability: the AOF is written before each reply (a kill -9
#: keeps it in the page cache) and fsynced once a second.  Wiping the data
#: directory emulates losing that last second to a power cut.
FSYNC_EVERYSEC = ("--appendonly", "yes", "--appendfsync", "everysec")


def assert_safe(scenario: Scenario, *labels: str) -> None:
    """No violation with fencing or without, and tokens rising across holders, wiped nodes or not."""
    verdict = scenario.verdict(*labels)
    assert verdict.sections > 0, scenario.explain("no section completed")
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
    assert verdict.overlaps == 0, scenario.explain("two holders were inside the section at once")
    assert verdict.lost_updates == 0, scenario.explain("the unfenced counter lost an update")
    assert verdict.token_inversions == 0, scenario.explain("a later holder got a token that was not higher")


def nothing_granted_while_down(scenario: Scenario, down_at: int, back_at: int) -> None:
    """No acquisition that began after ``down_at`` succeeded before ``back_at``."""
    history = scenario.history(reload=True)
    granted = [e for e in history.entered if down_at <= e["requested"] and e["enter"] < back_at]
    assert granted == [], scenario.explain(f"sections entered without a quorum: {granted[:3]}")
    assert history.events_of("unavailable", down_at), scenario.explain("no holder saw LockUnavailable")
    busy = [e for e in history.events_of("busy", down_at) if e["requested"] >= down_at and e["t"] < back_at]
    assert busy == [], scenario.explain("a lost quorum was reported as busy")


def warm_up(quorum: Quorum, times: int = 3) -> None:
    """Take and release the lock a few times, so the fencing counters are past 1."""
    redlock = Redlock(quorum.urls)
    for _ in range(times):
        redlock.acquire("shared", ttl=1).release()


def gated_holder(scenario: Scenario, quorum: Quorum, *, warmed: bool = False, **options: Any) -> None:
    """Start holder A in its own process, stopped inside its section until the gate opens."""
    if not warmed:
        warm_up(quorum)
    spec = scenario.spec(quorum, "A", gate=True, rounds=1, **options)
    scenario.spawn(spec)
    scenario.wait_inside("A")


def in_process_holder(scenario: Scenario, quorum: Quorum, name: str = "B", **options: Any) -> Holder:
    """A holder run step by step by the test itself."""
    options.setdefault("hold", 0.01)
    options.setdefault("acquire_timeout", 3.0)
    return Holder(scenario.spec(quorum, name, **options))


def finish_gated(scenario: Scenario, name: str = "A") -> dict[str, object]:
    """Open the gate of holder ``name`` and wait for its section to be recorded."""
    scenario.open_gate(name)
    scenario.stop_holders()
    (section,) = scenario.history(reload=True).section(name)
    return section


# -- node loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 5])
def test_node_loss_minority_then_majority(scenario: Scenario, size: int) -> None:
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(size, FSYNC_ALWAYS)
    minority = size - quorum.quorum
    order = scenario.random.sample(range(size), size)
    with running(scenario):
        scenario.spawn_many(quorum, 3, timing)
        scenario.wait_progress(soak(40, 400), timeout=20)

        quorum.kill(*order[:minority])  # the quorum still stands
        scenario.wait_progress(soak(40, 400), timeout=20)

        down_at = quorum.kill(order[minority])  # now a majority is gone
        time.sleep(soak(1.0, 5.0))
        back_at = now_ns()
        healed_at = quorum.start(*order[: minority + 1])
        scenario.wait_progress(10, timeout=timing.liveness_bound + 10)
    nothing_granted_while_down(scenario, down_at, back_at)
    scenario.liveness(healed_at, timing)
    assert_safe(scenario, "node loss")


# -- restarts with wiped data -----------------------------------------------------------------


def bare_majority_lock(scenario: Scenario, quorum: Quorum, outside: int, **options: Any) -> None:
    """Holder A takes the lock while node ``outside`` is down, so only a bare majority has it.

    A lock often lives on a bare majority: a node is down or slow when it is
    granted, or a contender's failed attempt holds that node for a moment.
    """
    warm_up(quorum)
    # Every node has processed the last release: none comes back holding it.
    wait_until(lambda: not any(quorum.client(i).exists("dlock:lock:shared") for i in range(3)), 5)
    quorum.kill(outside)
    gated_holder(scenario, quorum, warmed=True, **options)
    quorum.start(outside)  # back with its data, but it never saw A's lock


def test_wiped_restart_of_one_node_breaks_a_lock_held_by_a_bare_majority(scenario: Scenario) -> None:
    """One node is enough: it held half of A's bare majority and comes back empty at once."""
    quorum = scenario.quorum(3, FSYNC_EVERYSEC)
    bare_majority_lock(scenario, quorum, outside=2, ttl=10.0, auto_extend=False)
    quorum.restart(0, wipe=True)
    b_section = run_section(in_process_holder(scenario, quorum), 0)
    assert b_section is not None, scenario.explain("B could not take the lock from nodes 0 and 2")
    a_section = finish_gated(scenario)

    verdict = scenario.verdict("wiped restart of one node, no delay")
    assert verdict.overlaps >= 1, scenario.explain("expected A and B to overlap")
    assert verdict.lost_updates >= 1, scenario.explain("expected a lost update on the unfenced counter")
    # Node 0 lost its counter, but B's token is raised to B's clock floor: it is
    # still above A's, so the fenced resource takes B and refuses A's late write.
    assert b_section["token"] > a_section["token"], scenario.explain("B's token fell back with node 0's counter")
    assert verdict.token_inversions == 0
    assert b_section["claimed"] is True and a_section["wrote"] is False, scenario.explain(
        "the fenced resource should take B's higher token and refuse A's stale write"
    )
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")


def test_wiped_restart_of_a_majority_after_the_ttl_keeps_exclusion(scenario: Scenario) -> None:
    """Down for longer than any lease, the nodes come back empty: no lock of theirs is still valid.

    Their fencing counters are gone too, but the tokens do not go back (see
    ``test_a_majority_that_lost_its_counters_still_hands_out_higher_tokens``).
    """
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(3, FSYNC_EVERYSEC)
    for _ in range(soak(1, 5)):
        majority = scenario.random.sample(range(3), 2)
        with running(scenario):
            scenario.spawn_many(quorum, 3, timing)
            scenario.wait_progress(20, timeout=20)
            quorum.kill(*majority)
            time.sleep(timing.ttl + 0.3)  # the delay: at least the longest ttl
            healed_at = quorum.start(*majority, wipe=True, kind="node-wipe-restart-delayed")
            scenario.wait_progress(20, timeout=timing.liveness_bound + 10)
        scenario.liveness(healed_at, timing)
        scenario.recorder.delete("stop")
    assert_safe(scenario, "wiped restart of a majority after the ttl")


def test_wiped_restart_of_a_majority_immediately_breaks_exclusion(scenario: Scenario) -> None:
    """The unsafe case, made deterministic: A holds, two of three nodes restart empty, B takes the lock.

    Exclusion breaks (A and B overlap, and A's write loses B's update).  The
    wiped counters do not take the tokens back: B's is raised to its clock
    floor, above A's, so the fenced resource takes B and refuses A's stale
    write; its state stays that of one writer at a time.
    """
    quorum = scenario.quorum(3, FSYNC_EVERYSEC)
    gated_holder(scenario, quorum, ttl=10.0, auto_extend=False)
    quorum.restart(0, 1, wipe=True)
    b = in_process_holder(scenario, quorum)
    b_section = run_section(b, 0)
    assert b_section is not None, scenario.explain("B could not take the lock from the two empty nodes")
    a_section = finish_gated(scenario)

    verdict = scenario.verdict("wiped restart of a majority, no delay")
    assert verdict.overlaps >= 1, scenario.explain("expected A and B to overlap")
    assert verdict.lost_updates >= 1, scenario.explain("expected a lost update on the unfenced counter")
    assert b_section["token"] > a_section["token"], scenario.explain("B's token fell back with the wiped counters")
    assert verdict.token_inversions == 0
    assert b_section["claimed"] is True and a_section["wrote"] is False, scenario.explain(
        "the fenced resource should take B's higher token and refuse A's stale write"
    )
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")


def test_a_majority_that_lost_its_counters_still_hands_out_higher_tokens(scenario: Scenario) -> None:
    """Two nodes come back empty after more than a ttl; the third, which kept the counter, hangs.

    The next token comes from the two fresh counters alone, and is still the
    highest yet: the clock floor starts a fresh counter above every earlier
    token.
    """
    quorum = scenario.quorum(3, FSYNC_EVERYSEC)
    # Retries: the first command on a connection to a restarted node fails.
    redlock = Redlock(quorum.urls, retry_count=3, retry_delay=0.01, socket_timeout=0.2)
    tokens = []
    for _ in range(5):
        with redlock.lock("shared", ttl=0.5, auto_extend=False) as lock:
            tokens.append(lock.token)
    quorum.kill(0, 1)
    time.sleep(0.6)
    quorum.start(0, 1, wipe=True, kind="node-wipe-restart-delayed")
    quorum.pause(2)
    try:
        with redlock.lock("shared", ttl=0.5, auto_extend=False) as lock:
            after = lock.token
    finally:
        quorum.resume(2)
    assert after > tokens[-1], (tokens, after)
    scenario.notes["tokens"] = [*tokens, after]


def test_restart_of_a_majority_with_fsync_always_keeps_the_lock(scenario: Scenario) -> None:
    """With every write fsynced, a node restarted at once still has the lock it granted.

    (A's release right after the restart is lost on the restarted nodes, see
    ``test_a_release_right_after_a_node_restart_frees_every_node``, so A's
    lease is kept short: the holders below wait for it to run out.)
    """
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    gated_holder(scenario, quorum, ttl=1.5, auto_extend=False)
    quorum.restart(0, 1)
    probe = Redlock(quorum.urls, retry_count=0, socket_timeout=0.5)
    with pytest.raises(LockBusy):
        probe.acquire("shared", ttl=1, blocking=False)
    finish_gated(scenario)

    scenario.recorder.delete("stop")
    with running(scenario):
        scenario.spawn_many(quorum, 3, timing)
        scenario.wait_progress(20, timeout=20)
        for _ in range(soak(3, 30)):
            healed_at = quorum.restart(*scenario.random.sample(range(3), 2))
            scenario.wait_progress(10, timeout=timing.liveness_bound + 5)
            scenario.liveness(healed_at, timing)
    assert_safe(scenario, "restart of a majority with appendfsync always")


@pytest.mark.parametrize("how", ["release", "release_nowait"])
def test_a_release_right_after_a_node_restart_frees_every_node(scenario: Scenario, how: str) -> None:
    """The restarted nodes closed our connections: the release goes out on new ones, not into dead sockets.

    ``release()`` returns once a quorum has confirmed, ``release_nowait()`` at
    once; either way every node is free as soon as it has run the command,
    where a release written into a dead socket left the node holding the
    lock for its whole 30 s lease.
    """
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    redlock = Redlock(quorum.urls)
    lock = redlock.acquire("shared", ttl=30)  # a quorum decided: the third node may still be running it
    wait_until(lambda: all(quorum.client(i).exists("dlock:lock:shared") for i in range(3)), 5)
    quorum.restart(0, 1)  # with fsync always they come back holding the lock
    assert all(quorum.client(i).exists("dlock:lock:shared") for i in range(3))
    if how == "release":
        assert lock.release() is True
        assert sum(1 for i in range(3) if not quorum.client(i).exists("dlock:lock:shared")) >= redlock.quorum
    else:
        lock.release_nowait()
    # At once, or (had a node still been loading its data) by the background resends, within about 3 s.
    wait_until(lambda: not any(quorum.client(i).exists("dlock:lock:shared") for i in range(3)), 5)


@pytest.mark.parametrize("how", ["release", "release_nowait"])
def test_a_release_that_missed_a_node_reaches_it_once_it_is_back(scenario: Scenario, how: str) -> None:
    """Node 0 is down at the release and back half a second later, holding the lock: the resend frees it."""
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    redlock = Redlock(quorum.urls)
    lock = redlock.acquire("shared", ttl=30)
    quorum.kill(0)
    if how == "release":
        assert lock.release() is True  # the two others confirmed
    else:
        lock.release_nowait()
    time.sleep(0.5)  # the fault: the node stays down this long
    quorum.start(0)
    assert quorum.client(0).exists("dlock:lock:shared"), "it came back holding the lock"
    wait_until(lambda: not quorum.client(0).exists("dlock:lock:shared"), 5, message="the resent release")
    assert not any(quorum.client(i).exists("dlock:lock:shared") for i in (1, 2))


def test_a_release_reaches_a_restarted_node_whose_last_reply_was_never_read(scenario: Scenario) -> None:
    """Node 0 hangs through the acquire, so its reply is left unread; it then restarts holding the lock.

    The release skips the unread reply, finds the connection closed behind
    it, and goes out on a new one.
    """
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    redlock = Redlock(quorum.urls)
    redlock.acquire("warm", ttl=5).release()  # connected to every node
    quorum.pause(0)
    lock = redlock.acquire("shared", ttl=30)  # nodes 1 and 2 decide; node 0's reply is left unread
    quorum.resume(0)
    wait_until(lambda: quorum.client(0).exists("dlock:lock:shared"), 5, message="node 0 to run the acquire")
    quorum.restart(0)
    assert quorum.client(0).exists("dlock:lock:shared"), "it came back holding the lock"
    lock.release_nowait()
    wait_until(lambda: not any(quorum.client(i).exists("dlock:lock:shared") for i in range(3)), 5)


def test_a_stalled_minority_costs_nothing(scenario: Scenario) -> None:
    """2 of 5 nodes SIGSTOPped: 60 cycles, and none waits for them, whatever their connections do.

    The unread replies pile up until the connections are dropped, the dial
    again hangs (the kernel accepts, the node never answers), and from then
    on the node is dialled only in the background.  A cycle that waited for
    a stalled node would take the socket timeout (1 s here).
    """
    quorum = scenario.quorum(5)
    redlock = Redlock(quorum.urls, socket_timeout=1.0)
    redlock.acquire("shared", ttl=5).release()  # connected to every node
    quorum.pause(3, 4)
    try:
        slowest = 0.0
        for _ in range(60):  # past the 32 unread replies after which a connection is dropped
            started = time.monotonic()
            assert redlock.acquire("shared", ttl=5, blocking=False).release() is True
            slowest = max(slowest, time.monotonic() - started)
    finally:
        quorum.resume(3, 4)
    assert slowest < 0.5, f"a cycle took {slowest:.3f}s: it waited for a stalled node"
    # Resumed, the nodes are dialled again in the background and take part again.
    wait_until(lambda: _cycle_reaches_all(redlock, quorum), 10, message="the resumed nodes to be used again")


def _cycle_reaches_all(redlock: Redlock, quorum: Quorum) -> bool:
    with redlock.acquire("shared", ttl=5, blocking=False):
        return all(quorum.client(i).exists("dlock:lock:shared") for i in range(len(quorum)))


def test_a_blocked_acquire_does_not_spin_on_its_own_cleanup(scenario: Scenario) -> None:
    """Another owner holds a bare majority (nodes 1 and 2) for 1 s; node 0 is free."""
    quorum = scenario.quorum(3)
    for index in (1, 2):
        client = quorum.client(index)
        client.set("dlock:lock:shared", lock_value("someone-else", 1, "{}"), px=1000)
    node0 = quorum.client(0)
    node0.config_resetstat()
    redlock = Redlock(quorum.urls)  # retry_delay 0.2 s: about 5 attempts in that second
    lock = redlock.acquire("shared", ttl=5, timeout=5)
    lock.release()
    # Node 0 ran each attempt's acquire and, for the failed ones, its undo; and the last release.
    scripts = node0.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert scripts < 100, f"{scripts} script calls on node 0 in one second"


def test_renewals_repair_a_long_held_lock_on_nodes_that_lost_it(scenario: Scenario) -> None:
    """Two of three nodes restart empty one after the other; each renewal puts the lock back, so it holds.

    Without the repair the second wipe leaves the lock on node 2 alone, and
    a contender takes nodes 0 and 1.
    """
    quorum = scenario.quorum(3, VOLATILE)
    redlock = Redlock(quorum.urls)
    lock = redlock.acquire("shared", ttl=2, auto_extend=True, label="long")
    for index in (0, 1):
        quorum.restart(index, wipe=True)
        client = quorum.client(index)
        assert not client.exists("dlock:lock:shared")
        wait_until(
            lambda: stored_owner(client, "dlock:lock:shared") == lock.owner,
            5,
            message=f"a renewal to put the lock back on node {index}",
        )
        stored = stored_lock(client, "dlock:lock:shared")
        assert stored is not None and stored.token == lock.token and stored.meta["label"] == "long"
        assert 0 < client.pttl("dlock:lock:shared") <= 2000, "never a longer lease than the holder's"
    with pytest.raises(LockBusy):
        Redlock(quorum.urls, retry_count=0).acquire("shared", ttl=1, blocking=False)
    assert not lock.lost and lock.release() is True


# -- hangs --------------------------------------------------------------------------------------


def test_node_hangs_minority_then_majority(scenario: Scenario) -> None:
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(3)
    order = scenario.random.sample(range(3), 3)
    with running(scenario):
        scenario.spawn_many(quorum, 3, timing)
        scenario.wait_progress(20, timeout=20)

        quorum.pause(order[0])  # a hung minority costs nothing
        scenario.wait_progress(20, timeout=15)
        quorum.resume(order[0])

        down_at = quorum.pause(order[0], order[1])
        time.sleep(soak(timing.ttl + 0.5, 5.0))
        back_at = now_ns()
        healed_at = quorum.resume(order[0], order[1])
        scenario.wait_progress(10, timeout=timing.liveness_bound + 10)
    nothing_granted_while_down(scenario, down_at, back_at)
    scenario.liveness(healed_at, timing)
    assert_safe(scenario, "node hang")


# -- clock steps ------------------------------------------------------------------------------------


def test_clock_step_on_a_majority_breaks_exclusion_but_not_fencing(scenario: Scenario) -> None:
    """Two of three nodes see their clocks jump past A's lease: B takes the lock while A works.

    The counters are intact, so B's token is higher: the fenced resource
    refuses A's write once B has claimed it.
    """
    quorum = scenario.quorum(3)
    gated_holder(scenario, quorum, ttl=10.0, auto_extend=False)
    quorum.clock_step(0, 1, ms=20_000)
    b = in_process_holder(scenario, quorum)
    b_section = run_section(b, 0)
    assert b_section is not None, scenario.explain("B could not take the lock after the clock step")
    a_section = finish_gated(scenario)

    verdict = scenario.verdict("clock step on a majority")
    assert verdict.overlaps >= 1, scenario.explain("expected A and B to overlap")
    assert verdict.lost_updates >= 1, scenario.explain("expected a lost update on the unfenced counter")
    assert b_section["token"] > a_section["token"]
    assert b_section["wrote"] is True
    assert a_section["wrote"] is False, scenario.explain("the fenced resource took A's stale write")
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
    assert verdict.token_inversions == 0


def test_clock_step_on_one_node_breaks_a_lock_held_by_a_bare_majority(scenario: Scenario) -> None:
    """One node's clock jump is enough when it held half of A's bare majority.

    No counter is lost, so B's token is higher and fencing refuses A.
    """
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    bare_majority_lock(scenario, quorum, outside=2, ttl=10.0, auto_extend=False)
    quorum.clock_step(0, ms=20_000)
    b_section = run_section(in_process_holder(scenario, quorum), 0)
    assert b_section is not None, scenario.explain("B could not take the lock from nodes 0 and 2")
    a_section = finish_gated(scenario)

    verdict = scenario.verdict("clock step on one node")
    assert verdict.overlaps >= 1, scenario.explain("expected A and B to overlap")
    assert verdict.lost_updates >= 1, scenario.explain("expected a lost update on the unfenced counter")
    assert b_section["token"] > a_section["token"] and b_section["wrote"] is True
    assert a_section["wrote"] is False, scenario.explain("the fenced resource took A's stale write")
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
    assert verdict.token_inversions == 0


def test_successive_minority_clock_steps_do_not_wear_down_a_long_held_lock(scenario: Scenario) -> None:
    """A lock granted by every node no longer wears down: renewals repair the nodes that lost it.

    After one node's clock jumps, A's auto-extended lock is gone there, and
    A's next renewal puts it back; a second jump on another node, a full
    ttl later, leaves it on two nodes still, so B finds the key busy, and A
    finishes alone with its write accepted.  (Before renewals repaired, B
    took the lock from the two stepped nodes while A still worked.)
    """
    quorum = scenario.quorum(3)
    gated_holder(scenario, quorum, ttl=1.0, auto_extend=True)
    quorum.clock_step(0, ms=20_000)
    time.sleep(1.5)  # past A's ttl: A is still renewing, and has put the lock back on node 0
    assert quorum.client(0).exists("dlock:lock:shared"), scenario.explain("no renewal repaired node 0")
    quorum.clock_step(1, ms=20_000)
    b_section = run_section(in_process_holder(scenario, quorum, acquire_timeout=0.5), 0)
    assert b_section is None, scenario.explain("B took the lock A still holds")
    a_section = finish_gated(scenario)

    verdict = scenario.verdict("clock steps on one node after another")
    assert verdict.overlaps == 0, scenario.explain("A and B overlapped")
    assert a_section["wrote"] is True
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")


# -- full outage ---------------------------------------------------------------------------------------


def test_full_outage_is_unavailable_then_recovers(scenario: Scenario) -> None:
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(3, FSYNC_ALWAYS)
    with running(scenario):
        scenario.spawn_many(quorum, 3, timing)
        scenario.wait_progress(20, timeout=20)

        down_at = quorum.outage()
        probe = Redlock(quorum.urls, retry_count=0, socket_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(LockUnavailable) as caught:
            probe.acquire("shared", ttl=1, blocking=False)
        assert not isinstance(caught.value, LockBusy)
        assert len(caught.value.errors) == 3
        assert time.monotonic() - started < 1.0
        time.sleep(soak(1.0, 5.0))

        back_at = now_ns()
        healed_at = quorum.start(0, 1, 2)
        scenario.wait_progress(10, timeout=timing.liveness_bound + 10)
    nothing_granted_while_down(scenario, down_at, back_at)
    scenario.liveness(healed_at, timing)
    assert_safe(scenario, "full outage")


def test_full_outage_of_volatile_nodes_restarted_after_the_ttl(scenario: Scenario) -> None:
    """Nodes that keep nothing are safe to bring back once every lease has run out."""
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(3, VOLATILE)
    with running(scenario):
        scenario.spawn_many(quorum, 3, timing)
        scenario.wait_progress(20, timeout=20)
        down_at = quorum.outage()
        time.sleep(timing.ttl + 0.3)
        back_at = now_ns()
        healed_at = quorum.start(0, 1, 2, kind="node-wipe-restart-delayed")
        scenario.wait_progress(10, timeout=timing.liveness_bound + 10)
    nothing_granted_while_down(scenario, down_at, back_at)
    scenario.liveness(healed_at, timing)
    assert_safe(scenario, "full outage, delayed restart")
