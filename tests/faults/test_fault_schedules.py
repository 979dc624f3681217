"""Random fault schedules (Hypothesis state machines) against a 3-node quorum.

Two holder processes run sections on one key for the whole example while
Hypothesis picks the faults: kill, restart, pause and resume nodes (fsync
always, so a restart keeps the data), and, in the full machine, pause and
resume holders and step node clocks (shrink every PTTL).  After every step
the fenced resource must not have accepted anything stale; at the end every
fault is healed, the lock must come back within its bound, fencing tokens
must have risen across holders, and, in the crash-safe machine (node faults
only), no two sections may have overlapped and no update may have been lost.

The default profile runs a few derandomized examples; ``DLOCK_SOAK=1`` runs
many more, with longer schedules.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fault_harness import FSYNC_ALWAYS, SOAK, HolderProcess, Quorum, Scenario, Timing, now_ns, soak
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

pytestmark = [pytest.mark.faults, pytest.mark.multinode, pytest.mark.timeout(1800 if SOAK else 240)]

SETTINGS = settings(
    max_examples=soak(6, 60),
    stateful_step_count=soak(12, 40),
    deadline=None,
    derandomize=not SOAK,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


class FaultSchedule(RuleBasedStateMachine):
    """Faults chosen by Hypothesis while two holders work; see the module docstring."""

    tmp_path: ClassVar[Path]
    stats: ClassVar[Any]
    crash_safe_only: ClassVar[bool] = False
    timing: ClassVar[Timing] = Timing(ttl=1.0)
    examples: ClassVar[itertools.count[int]]

    def __init__(self) -> None:
        super().__init__()
        number = next(self.examples)
        name = f"schedule-{'crash-safe' if self.crash_safe_only else 'all'}-{number}"
        directory = self.tmp_path / name
        directory.mkdir()
        self.scenario = Scenario(name, directory, seed=number, stats=self.stats)
        self.quorum: Quorum = self.scenario.quorum(3, FSYNC_ALWAYS)
        self.holders: list[HolderProcess] = self.scenario.spawn_many(self.quorum, 2, self.timing, hold=0.01)
        self.scenario.wait_progress(5, timeout=20)  # both holders are at work before the first fault

    # -- which nodes and holders a fault may target --------------------------------------

    def up(self) -> list[int]:
        return [i for i in range(3) if self.quorum.running(i) and i not in self.quorum.paused]

    def down(self) -> list[int]:
        return [i for i in range(3) if not self.quorum.running(i)]

    def working(self) -> list[int]:
        return [i for i, holder in enumerate(self.holders) if not holder.paused]

    # -- crash-safe faults: nodes --------------------------------------------------------

    @precondition(lambda self: self.up())
    @rule(data=st.data())
    def kill_node(self, data: st.DataObject) -> None:
        self.quorum.kill(data.draw(st.sampled_from(self.up()), label="node"))

    @precondition(lambda self: self.down())
    @rule(data=st.data())
    def restart_node(self, data: st.DataObject) -> None:
        self.quorum.start(data.draw(st.sampled_from(self.down()), label="node"))

    @precondition(lambda self: self.up())
    @rule(data=st.data())
    def restart_running_node(self, data: st.DataObject) -> None:
        self.quorum.restart(data.draw(st.sampled_from(self.up()), label="node"))

    @precondition(lambda self: self.up())
    @rule(data=st.data())
    def pause_node(self, data: st.DataObject) -> None:
        self.quorum.pause(data.draw(st.sampled_from(self.up()), label="node"))

    @precondition(lambda self: self.quorum.paused)
    @rule(data=st.data())
    def resume_node(self, data: st.DataObject) -> None:
        self.quorum.resume(data.draw(st.sampled_from(sorted(self.quorum.paused)), label="node"))

    @rule(ms=st.integers(min_value=50, max_value=600))
    def let_time_pass(self, ms: int) -> None:
        time.sleep(ms / 1000)

    # -- faults that can break exclusion: holders paused, clocks stepped -----------------------

    @precondition(lambda self: not self.crash_safe_only and self.working())
    @rule(data=st.data())
    def pause_holder(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(self.working()), label="holder")
        self.holders[index].pause()
        self.scenario.faults.add("holder-pause", holder=self.holders[index].spec.holder)

    @precondition(lambda self: any(holder.paused for holder in self.holders))
    @rule(data=st.data())
    def resume_holder(self, data: st.DataObject) -> None:
        paused = [i for i, holder in enumerate(self.holders) if holder.paused]
        index = data.draw(st.sampled_from(paused), label="holder")
        self.holders[index].resume()
        self.scenario.faults.add("holder-resume", holder=self.holders[index].spec.holder)

    @precondition(lambda self: not self.crash_safe_only and self.up())
    @rule(data=st.data(), ms=st.integers(min_value=100, max_value=5_000))
    def step_clocks(self, data: st.DataObject, ms: int) -> None:
        nodes = data.draw(st.sets(st.sampled_from(self.up()), min_size=1), label="nodes")
        self.quorum.clock_step(*sorted(nodes), ms=ms)

    # -- checks -------------------------------------------------------------------------------

    @invariant()
    def fenced_resource_accepted_nothing_stale(self) -> None:
        fenced, examples = self.scenario.history(reload=True).fenced_violations()
        assert not fenced, self.scenario.explain(f"the fenced resource accepted a stale token: {examples}")

    def teardown(self) -> None:
        scenario = self.scenario
        try:
            for holder in self.holders:
                if holder.paused:
                    holder.resume()
                    scenario.faults.add("holder-resume", holder=holder.spec.holder)
            self.quorum.heal()
            healed_at = now_ns()
            scenario.wait_progress(5, timeout=self.timing.liveness_bound + 15)
            scenario.liveness(healed_at, self.timing)
            scenario.stop_holders()
            verdict = scenario.verdict("random schedule" + (", crash-safe faults" if self.crash_safe_only else ""))
            assert verdict.fenced_violations == 0, scenario.explain("the fenced resource accepted a stale token")
            assert verdict.token_inversions == 0, scenario.explain("a later holder got a token that was not higher")
            if self.crash_safe_only:
                assert verdict.overlaps == 0, scenario.explain("two holders were inside at once")
                assert verdict.lost_updates == 0, scenario.explain("the unfenced counter lost an update")
        finally:
            scenario.close()


def run_machine(tmp_path: Path, stats: Any, crash_safe_only: bool) -> None:
    machine = type(
        "Schedule",
        (FaultSchedule,),
        {
            "tmp_path": tmp_path,
            "stats": stats,
            "crash_safe_only": crash_safe_only,
            # Crash-safe runs assert no overlap at all: a longer lease keeps a
            # holder that the loaded machine deschedules for a moment safe.
            "timing": Timing(ttl=2.0) if crash_safe_only else Timing(ttl=0.8),
            "examples": itertools.count(),
        },
    )
    run_state_machine_as_test(machine, settings=SETTINGS)


def test_random_fault_schedules_never_get_past_the_fence(tmp_path: Path, fault_stats: Any) -> None:
    run_machine(tmp_path, fault_stats, crash_safe_only=False)


def test_random_crash_safe_fault_schedules_keep_exclusion(tmp_path: Path, fault_stats: Any) -> None:
    run_machine(tmp_path, fault_stats, crash_safe_only=True)
