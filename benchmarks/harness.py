"""Interleaved timing: every variant runs a batch in turn, round after round.

Timing variants one after another lets drift in the machine (another
process, CPU frequency, the page cache) land on one variant only.  Here each
round runs a batch of every variant, in a fresh random order, so whatever
drifts is spread over all of them alike.  The first rounds are warm-up and
are thrown away: they open connections, load scripts and fill caches.

Each operation is timed on its own with :func:`time.perf_counter_ns`, so the
results are distributions, not averages.  An operation the calling thread
cannot time (a span between two other threads, a whole worker run) is
*self-timed*: it measures itself and returns its sample.  The garbage collector is paused
while a batch runs and a collection is made between rounds, as ``timeit``
does, so that one variant does not pay for another's garbage.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Op", "Schedule", "Timings", "Variant", "run_interleaved"]

#: One operation to time.  What it returns is ignored, unless its variant is
#: ``self_timed``: it then returns its own duration in nanoseconds.
Op = Callable[[], object]

#: Per-operation durations in nanoseconds, one list per measured round.
Timings = list[list[int]]


@dataclass(frozen=True)
class Variant:
    """One thing to time: an operation and how the reports name it.

    Attributes:
        key: A short identifier, used in ratios and the JSON dump.
        label: The name printed in tables and plot legends.
        family: Variants of one family differ only in their node count; plots
            draw each family as one line.
        nodes: How many redis-server nodes the operation talks to.
        op: The operation, to be called once per timed sample.
        self_timed: Whether ``op`` measures itself and returns the sample
            (an ``int`` of nanoseconds), for what the calling thread cannot
            time: a span between two other threads, or a whole worker run.

    """

    key: str
    label: str
    family: str
    nodes: int
    op: Op
    self_timed: bool = False


@dataclass(frozen=True)
class Schedule:
    """How many rounds to run, and how many operations per batch.

    Attributes:
        rounds: Measured rounds.
        warmup: Rounds run first and discarded.
        batch: Operations of each variant per round.

    """

    rounds: int
    warmup: int
    batch: int

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.batch < 1 or self.warmup < 0:
            raise ValueError(f"invalid schedule: {self}")

    @property
    def samples(self) -> int:
        """Measured operations per variant."""
        return self.rounds * self.batch


def run_interleaved(variants: Sequence[Variant], schedule: Schedule, rng: random.Random) -> dict[str, Timings]:
    """Time every variant in interleaved rounds; returns timings by variant key.

    Warm-up rounds run the same way as measured ones but are not kept.
    """
    keys = [variant.key for variant in variants]
    if len(set(keys)) != len(keys):
        raise ValueError(f"variant keys must be unique: {keys}")
    timings: dict[str, Timings] = {key: [] for key in keys}
    order = list(variants)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_no in range(schedule.warmup + schedule.rounds):
            rng.shuffle(order)
            for variant in order:
                batch = _time_batch(variant, schedule.batch)
                if round_no >= schedule.warmup:
                    timings[variant.key].append(batch)
            gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    return timings


def _time_batch(variant: Variant, count: int) -> list[int]:
    """Run the variant's op ``count`` times; each sample in nanoseconds."""
    op = variant.op
    if variant.self_timed:
        return [_sample(op()) for _ in range(count)]
    clock = time.perf_counter_ns
    durations = []
    for _ in range(count):
        started = clock()
        op()
        durations.append(clock() - started)
    return durations


def _sample(value: object) -> int:
    """A self-timed op's result, checked: a duration in nanoseconds."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"a self-timed op must return nanoseconds as an int, got {value!r}")
    return value
