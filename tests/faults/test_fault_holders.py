"""Faults on the lock holders: a pause past the lease, and kill -9 at named points.

* A holder frozen with ``SIGSTOP`` past its ttl (its watchdog thread frozen
  with it) loses the lock to the next holder, and when ``SIGCONT`` wakes it
  it writes anyway: exclusion breaks, fencing refuses the stale write.
* A holder killed at ``after-acquire``, ``mid-extend`` or ``before-release``
  (``DLOCK_FAULT_POINTS``) leaves a lease that runs out within one ttl: the
  other holders go on, nothing deadlocks, nothing overlaps.
"""

from __future__ import annotations

import signal
import time

import pytest
from fault_harness import Scenario, Timing, now_ns, running, soak
from fault_holder import Holder, run_section

from celery_dlock import Redlock

pytestmark = [pytest.mark.faults, pytest.mark.multinode, pytest.mark.timeout(180)]


def test_holder_paused_past_its_ttl_overlaps_and_is_fenced_out(scenario: Scenario) -> None:
    quorum = scenario.quorum(3)
    warm = Redlock(quorum.urls)
    for _ in range(3):
        warm.acquire("shared", ttl=1).release()

    spec_a = scenario.spec(quorum, "A", ttl=0.6, auto_extend=True, gate=True, rounds=1)
    a = scenario.spawn(spec_a)
    scenario.wait_inside("A")
    a.pause()
    scenario.faults.add("holder-pause", holder="A")
    time.sleep(spec_a.ttl + 0.4)  # the lease runs out; the frozen watchdog cannot renew it

    b = Holder(scenario.spec(quorum, "B", hold=0.01, acquire_timeout=3.0))
    b_section = run_section(b, 0)
    assert b_section is not None, scenario.explain("B could not take the lapsed lock")
    scenario.open_gate("A")
    a.resume()  # A wakes up and writes, as a paused process does
    scenario.faults.add("holder-resume", holder="A")
    scenario.stop_holders()

    (a_section,) = scenario.history(reload=True).section("A")
    verdict = scenario.verdict("holder pause")
    assert verdict.overlaps >= 1, scenario.explain("expected A's section to span B's")
    assert verdict.lost_updates >= 1, scenario.explain("expected A's write to lose B's update")
    assert a_section["enter"] < b_section["enter"] and b_section["exit"] < a_section["exit"]
    assert a_section["lost"] is True, "the lock knew it was lost: a holder that checks would have stopped"
    assert b_section["token"] > a_section["token"]
    assert b_section["wrote"] is True
    assert a_section["claimed"] is True and a_section["wrote"] is False, scenario.explain(
        "the fenced resource accepted A's write after B's claim"
    )
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
    assert verdict.token_inversions == 0


@pytest.mark.parametrize("point", ["after-acquire", "mid-extend", "before-release"])
def test_holder_killed_at_a_fault_point_never_deadlocks(scenario: Scenario, point: str) -> None:
    timing = Timing(ttl=1.0)
    quorum = scenario.quorum(3)
    with running(scenario):
        scenario.spawn_many(quorum, 2, timing)
        scenario.wait_progress(10, timeout=20)
        for round_ in range(soak(1, 10)):
            # hold 0.6 s: past ttl / 3, so the watchdog renews inside the section
            spec = scenario.spec(quorum, f"crash{round_}", timing, hold=0.6, hold_jitter=0.0)
            crasher = scenario.spawn(spec, fault_points=[point])
            status = crasher.wait(30)
            died_at = scenario.faults.add("holder-crash", point=point, holder=spec.holder)
            assert status == -signal.SIGKILL, f"{crasher} should have died at {point}:\n{crasher.log_tail()}"
            scenario.wait_progress(10, timeout=timing.liveness_bound + 10)
            delay = scenario.liveness(died_at, timing)
            scenario.notes.setdefault("waited_for_dead_lease", []).append(round(delay, 3))

    history = scenario.history(reload=True)
    crashed = [e for e in history.entered if e["holder"].startswith("crash")]
    finished = [s for s in history.sections if s["holder"].startswith("crash")]
    if point == "after-acquire":
        assert crashed == [] and finished == []  # killed before the section began
    elif point == "mid-extend":
        assert crashed and finished == []  # killed inside it, by its own watchdog thread
    else:
        assert len(finished) == len(crashed) >= 1  # killed after the section, before the release
    assert_holders_went_on(scenario)
    verdict = scenario.verdict(f"holder kill -9 at {point}")
    assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
    assert verdict.unfenced_violations == 0, scenario.explain("a crash let two holders in at once")
    assert verdict.token_inversions == 0


def assert_holders_went_on(scenario: Scenario) -> None:
    """The surviving holders finished sections after the last crash."""
    last_crash = max(f["t"] for f in scenario.faults.entries if f["kind"] == "holder-crash")
    after = scenario.history().entries_between(last_crash, now_ns())
    assert after, scenario.explain("no section after the crash: deadlock")
