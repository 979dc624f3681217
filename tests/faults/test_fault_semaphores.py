"""Semaphores under faults: at most ``limit`` holders at once, whatever fails.

Holder processes (:mod:`fault_holder`) take one of ``LIMIT`` permits of one
key while the test kills holders and kills, restarts, pauses and steps the
clocks of nodes.  The checker records how many sections were open at once
and the run fails if that ever passed the limit.  The limits and node counts
are chosen where ``docs/guarantees.md`` promises safety: a permit needs
``⌊N·L/(L+1)⌋ + 1`` nodes, so on 5 nodes a limit of 3 survives one node
failing, and on 3 nodes a limit of 3 needs every node.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fault_harness import FSYNC_ALWAYS, Quorum, Scenario, Timing, now_ns, running

from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.multinode, pytest.mark.timeout(180)]

LIMIT = 3
HOLDERS = 6
TIMING = Timing(ttl=1.0)


def start_holders(scenario: Scenario, size: int) -> Quorum:
    """``size`` nodes and :data:`HOLDERS` holders contending for :data:`LIMIT` permits."""
    quorum = scenario.quorum(size, FSYNC_ALWAYS)
    scenario.spawn_many(quorum, HOLDERS, TIMING, limit=LIMIT, hold=0.03, acquire_timeout=3.0)
    scenario.wait_progress(20, timeout=30)
    return quorum


def inside(scenario: Scenario, name: str) -> bool:
    """Whether holder ``name`` has entered a section it has not left."""
    history = scenario.history(reload=True)
    return sum(1 for e in history.entered if e["holder"] == name) > len(history.section(name))


def assert_within_limit(scenario: Scenario, label: str) -> None:
    """No more than :data:`LIMIT` sections at once, tokens rising, and the permits really shared."""
    verdict = scenario.verdict(label, limit=LIMIT)
    most = verdict.most_at_once.get("shared", 0)
    assert verdict.sections > 0, scenario.explain("no section completed")
    assert most <= LIMIT, scenario.explain(f"{most} holders were inside at once; the limit is {LIMIT}")
    assert most >= 2, scenario.explain("the permits were never held by two at once: not a semaphore")
    assert verdict.token_inversions == 0, scenario.explain("a later holder got a token that was not higher")


@pytest.mark.parametrize("size", [1, 3, 5])
def test_holders_killed_mid_section_never_push_past_the_limit(scenario: Scenario, size: int) -> None:
    """Two holders die inside their sections; their permits run out with the lease, not sooner."""
    with running(scenario):
        start_holders(scenario, size)
        for victim in scenario.holders[:2]:
            name = victim.spec.holder
            wait_until(lambda name=name: inside(scenario, name), 10, interval=0.002, message=f"{name} inside")
            victim.kill()
            scenario.faults.add("holder-kill", holder=victim.spec.holder)
        scenario.wait_progress(30, timeout=30)
    assert_within_limit(scenario, "semaphore, holders killed")


#: Faults on one node of five, each as the step that breaks and the step that heals.
FIVE_NODE_FAULTS: dict[str, tuple[Callable[[Quorum], object], Callable[[Quorum], object]]] = {
    "node loss and restart": (lambda quorum: quorum.kill(4), lambda quorum: (quorum.start(4), quorum.restart(0))),
    "node paused": (lambda quorum: quorum.pause(2), lambda quorum: quorum.resume(2)),
}


@pytest.mark.parametrize("fault", FIVE_NODE_FAULTS)
def test_a_node_fault_on_five_keeps_the_limit(scenario: Scenario, fault: str) -> None:
    """Five nodes, a limit of 3: a permit needs 4 nodes, so one node may fail and come back."""
    fail, heal = FIVE_NODE_FAULTS[fault]
    with running(scenario):
        quorum = start_holders(scenario, 5)
        fail(quorum)
        scenario.wait_progress(30, timeout=30)
        heal(quorum)
        scenario.wait_progress(30, timeout=30)
    assert_within_limit(scenario, f"semaphore, {fault}")


def test_a_clock_step_on_one_of_three_nodes_keeps_the_limit(scenario: Scenario) -> None:
    """On 3 nodes a permit of 3 needs all of them, so the two whose clocks did not move still refuse."""
    with running(scenario):
        quorum = start_holders(scenario, 3)
        for _ in range(3):
            quorum.clock_step(1, ms=900)
            scenario.wait_progress(10, timeout=30)
    assert_within_limit(scenario, "semaphore, clock step")


def test_a_limit_above_one_on_three_nodes_needs_every_node(scenario: Scenario) -> None:
    """The price of the rule: with a node down, no new permit is granted, and they come back after."""
    with running(scenario):
        quorum = start_holders(scenario, 3)
        down_at = quorum.kill(1)
        wait_until(
            lambda: scenario.history(reload=True).events_of("unavailable", down_at),
            15,
            interval=0.05,
            message="a holder told the lock is unavailable",
        )
        back_at = now_ns()
        healed_at = quorum.start(1)
        scenario.wait_progress(20, timeout=TIMING.liveness_bound + 20)
    history = scenario.history(reload=True)
    granted = [e for e in history.entered if down_at <= e["requested"] and e["enter"] < back_at]
    assert granted == [], scenario.explain(f"permits granted without every node: {granted[:3]}")
    assert history.events_of("unavailable", down_at), scenario.explain("no holder saw LockUnavailable")
    scenario.liveness(healed_at, TIMING)
    assert_within_limit(scenario, "semaphore, node loss on three")
