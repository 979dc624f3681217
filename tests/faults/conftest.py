"""Fixtures of the fault-injection suite, and its end-of-run summary.

``scenario`` gives each test a :class:`~fault_harness.Scenario` (a recorder,
quorum factory, holder processes and a fault log) seeded from
``DLOCK_FAULT_SEED`` and the test's name.  When the test fails, the run's JSON
history is saved under the test's ``tmp_path`` and its path printed; set
``DLOCK_FAULT_KEEP=1`` to keep every history.  ``DLOCK_SOAK=1`` makes the
same tests run longer (see :func:`fault_harness.soak`).

At the end of a run the summary lists the critical sections checked, the
faults injected by kind, and the violations with and without fencing.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from collections import Counter
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_harness import BASE_SEED, KEEP_HISTORIES, SOAK, Scenario


class FaultStats:
    """Totals over every scenario judged in this session."""

    def __init__(self) -> None:
        self.sections = 0
        self.entered = 0
        self.faults: Counter[str] = Counter()
        self.fenced_violations = 0
        self.unfenced: dict[str, dict[str, int]] = {}
        self.token_inversions: dict[str, int] = {}
        self.liveness: list[float] = []
        self.most_at_once: dict[str, dict[str, int]] = {}
        self.scenarios = 0

    def add(self, scenario: Scenario) -> None:
        verdict = scenario._verdict
        assert verdict is not None
        self.scenarios += 1
        self.sections += verdict.sections
        self.entered += verdict.entered
        self.faults.update(scenario.faults.kinds())
        self.fenced_violations += verdict.fenced_violations
        if verdict.unfenced_violations:
            label = ", ".join(sorted(scenario.labels)) or scenario.name
            entry = self.unfenced.setdefault(label, {"overlaps": 0, "lost_updates": 0, "runs": 0})
            entry["overlaps"] += verdict.overlaps
            entry["lost_updates"] += verdict.lost_updates
            entry["runs"] += 1
        if verdict.token_inversions:
            label = ", ".join(sorted(scenario.labels)) or scenario.name
            self.token_inversions[label] = self.token_inversions.get(label, 0) + verdict.token_inversions
        self.liveness.extend(scenario.notes.get("liveness", []))
        if verdict.limit > 1:
            label = ", ".join(sorted(scenario.labels)) or scenario.name
            seen = self.most_at_once.setdefault(label, {"limit": verdict.limit, "most": 0, "runs": 0})
            seen["most"] = max(seen["most"], *verdict.most_at_once.values(), 0)
            seen["runs"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenarios": self.scenarios,
            "sections_checked": self.sections,
            "sections_entered": self.entered,
            "faults": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "violations_with_fencing": self.fenced_violations,
            "violations_without_fencing": self.unfenced,
            "token_inversions": self.token_inversions,
            "semaphores_most_at_once": self.most_at_once,
            "liveness_seconds_max": max(self.liveness, default=None),
            "liveness_samples": len(self.liveness),
            "soak": SOAK,
            "base_seed": BASE_SEED,
        }


_STATS = FaultStats()
_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.fixture(scope="session")
def fault_stats() -> FaultStats:
    """The session's totals."""
    return _STATS


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORT_KEY, {})[report.when] = report
    return report


def seed_for(nodeid: str) -> int:
    """The seed of one test: the base seed mixed with the test's id."""
    return BASE_SEED ^ zlib.crc32(nodeid.encode())


@pytest.fixture
def scenario(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scenario]:
    """A fault run for this test; its history is saved if the test fails."""
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    run = Scenario(name, tmp_path, seed_for(request.node.nodeid), _STATS)
    try:
        yield run
    finally:
        reports = request.node.stash.get(_REPORT_KEY, {})
        failed = any(report.failed for report in reports.values())
        try:
            if failed or KEEP_HISTORIES:
                path = run.save()
                print(f"\nfault history of {request.node.nodeid}: {path}")
        finally:
            run.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _STATS.scenarios:
        return
    data = _STATS.as_dict()
    path = Path(tempfile.gettempdir()) / "dlock-faults-summary.json"
    path.write_text(json.dumps(data, indent=1))
    write = terminalreporter.write_line
    terminalreporter.section("dlock fault injection")
    write(f"scenarios judged: {data['scenarios']}   critical sections checked: {data['sections_checked']} "
          f"(entered: {data['sections_entered']})")  # fmt: skip
    write(f"faults injected: {data['faults_total']}  " + ", ".join(f"{k}={v}" for k, v in data["faults"].items()))
    write(f"violations with fencing: {data['violations_with_fencing']}")
    if data["violations_without_fencing"]:
        for label, counts in data["violations_without_fencing"].items():
            write(f"violations without fencing under [{label}]: {counts}")
    else:
        write("violations without fencing: 0")
    for label, seen in data["semaphores_most_at_once"].items():
        write(f"semaphore under [{label}]: most holders at once {seen['most']} of limit {seen['limit']}")
    for label, count in data["token_inversions"].items():
        write(f"token inversions under [{label}]: {count}")
    if data["liveness_seconds_max"] is not None:
        write(f"liveness after heal: worst {data['liveness_seconds_max']:.2f}s over {data['liveness_samples']} heals")
    write(f"summary: {path}")
