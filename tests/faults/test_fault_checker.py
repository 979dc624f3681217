"""The checker itself: it finds each kind of violation, and none in a clean run.

The synthetic histories show that every check can fire (a checker that
never reports anything would make every other test here pass).  The baseline
runs K holder processes x M sections with no fault and checks the exact
counts: no false positives, and nothing missing from the record.
"""

from __future__ import annotations

from typing import Any

import pytest
from fault_checker import History
from fault_harness import Scenario, Timing, running, soak

pytestmark = [pytest.mark.faults]


def entered(section: str, token: int, requested: int, enter: int, key: str = "k") -> dict[str, Any]:
    return {"section": section, "holder": section.split("#", maxsplit=1)[0], "key": key, "token": token,
            "requested": requested, "enter": enter}  # fmt: skip


def done(entry: dict[str, Any], leave: int) -> dict[str, Any]:
    return {**entry, "exit": leave}


def op(kind: str, token: int, section: str, ok: int, value: str = "") -> dict[str, Any]:
    return {"op": kind, "token": token, "section": section, "ok": ok, "value": value}


def history(**parts: Any) -> History:
    base: dict[str, Any] = {"entered": [], "sections": [], "events": [], "writes": [], "fenced_log": [], "counter": 0}
    base.update(parts)
    return History(**base)


def test_a_clean_history_has_no_violation() -> None:
    a, b = entered("a#0", 1, 0, 10), entered("b#0", 2, 5, 30)
    clean = history(
        entered=[a, b],
        sections=[done(a, 20), done(b, 40)],
        writes=[{}, {}],
        counter=2,
        fenced_log=[op("claim", 1, "a#0", 1), op("write", 1, "a#0", 1, "1"),
                    op("claim", 2, "b#0", 1), op("write", 2, "b#0", 1, "2")],
    )  # fmt: skip
    verdict = clean.verdict()
    assert (verdict.overlaps, verdict.lost_updates, verdict.fenced_violations, verdict.token_inversions) == (0, 0, 0, 0)


def test_overlaps_and_lost_updates_are_found() -> None:
    a, b = entered("a#0", 1, 0, 10), entered("b#0", 2, 12, 15)
    verdict = history(entered=[a, b], sections=[done(a, 50), done(b, 20)], writes=[{}, {}], counter=1).verdict()
    assert verdict.overlaps == 1 and verdict.lost_updates == 1


def test_stale_claims_and_writes_are_found() -> None:
    def found(*log: dict[str, Any]) -> dict[str, int]:
        return dict(history(fenced_log=list(log)).fenced_violations()[0])

    assert found(op("claim", 5, "a#0", 1), op("claim", 4, "b#0", 1)) == {"stale-claim": 1}
    assert found(op("claim", 5, "a#0", 1), op("write", 5, "c#0", 1, "1")) == {"stale-write": 1}
    assert found(op("claim", 5, "a#0", 1), op("claim", 6, "b#0", 1), op("write", 5, "a#0", 1, "1")) == {
        "stale-write": 1
    }
    assert found(op("claim", 5, "a#0", 1), op("write", 5, "a#0", 1, "1"), op("write", 5, "a#0", 1, "1")) == {
        "fenced-lost-update": 1
    }
    assert found(op("claim", 5, "a#0", 1), op("claim", 4, "b#0", 0), op("write", 4, "b#0", 0, "1")) == {}


def test_a_superseded_holder_and_a_token_inversion_are_found() -> None:
    # A was granted at 10 with token 5; B asked at 20, after that, yet got 3.
    a, b = entered("a#0", 5, 0, 10), entered("b#0", 3, 20, 30)
    log = [op("claim", 3, "b#0", 1), op("claim", 5, "a#0", 1)]
    h = history(entered=[a, b], fenced_log=log)
    fenced, _ = h.fenced_violations()
    assert fenced["superseded"] == 1
    assert h.token_inversions() == [(a, b)]


def test_k_holders_times_m_sections_with_no_fault(scenario: Scenario) -> None:
    holders, rounds = 4, soak(100, 1000)
    quorum = scenario.quorum(3)
    with running(scenario):
        timing = Timing(ttl=2.0)
        for process in scenario.spawn_many(quorum, holders, timing, hold=0.004, rounds=rounds, acquire_timeout=30.0):
            process.wait(120)
    verdict = scenario.verdict("no fault")
    h = scenario.history()
    assert verdict.sections == verdict.entered == holders * rounds, scenario.explain("sections went missing")
    assert h.counter == len(h.writes) == holders * rounds
    assert int(scenario.recorder.hget("fenced", "value")) == holders * rounds
    assert verdict.unfenced_violations == 0 and verdict.fenced_violations == 0 and verdict.token_inversions == 0
    assert verdict.fenced_refusals == 0
