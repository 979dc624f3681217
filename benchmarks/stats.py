"""Summaries of timings: medians and tails, ratios between variants, targets.

A ratio is computed three ways: between the two variants' medians, between
their 99th percentiles, and round by round.  Since every round runs both
variants back to back, the spread of the per-round ratios (10th to 90th
percentile) shows how much of a difference is noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

from .harness import Timings

__all__ = [
    "Ratio",
    "RatioValue",
    "Stats",
    "Target",
    "TargetOutcome",
    "evaluate",
    "judge",
    "summarize",
]


@dataclass(frozen=True)
class Stats:
    """The distribution of one variant's operation times, in microseconds."""

    median_us: float
    p99_us: float
    min_us: float
    samples: int


def summarize(timings: Timings) -> Stats:
    """Median, 99th percentile and minimum of all measured rounds."""
    flat = sorted(chain.from_iterable(timings))
    if not flat:
        raise ValueError("no samples")
    return Stats(
        median_us=_percentile(flat, 50) / 1000,
        p99_us=_percentile(flat, 99) / 1000,
        min_us=flat[0] / 1000,
        samples=len(flat),
    )


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator``, two variant keys, under a printable label."""

    label: str
    numerator: str
    denominator: str


@dataclass(frozen=True)
class RatioValue:
    """A ratio measured: on medians, on p99s, and round by round (p10, p50, p90)."""

    ratio: Ratio
    median: float
    p99: float
    round_p10: float
    round_p50: float
    round_p90: float


def evaluate(ratio: Ratio, timings: Mapping[str, Timings]) -> RatioValue | None:
    """Measure ``ratio``, or None if either variant was not run."""
    top = timings.get(ratio.numerator)
    bottom = timings.get(ratio.denominator)
    if not top or not bottom:
        return None
    top_stats, bottom_stats = summarize(top), summarize(bottom)
    per_round = sorted(statistics.median(a) / statistics.median(b) for a, b in zip(top, bottom, strict=True))
    return RatioValue(
        ratio=ratio,
        median=top_stats.median_us / bottom_stats.median_us,
        p99=top_stats.p99_us / bottom_stats.p99_us,
        round_p10=_percentile(per_round, 10),
        round_p50=_percentile(per_round, 50),
        round_p90=_percentile(per_round, 90),
    )


@dataclass(frozen=True)
class Target:
    """A goal on a ratio, such as ``ours(1) / floor <= 1.15``.

    ``basis`` says which value of the ratio is judged: ``"medians"``, the
    ratio of the two variants' medians, or ``"rounds"``, the median of the
    per-round ratios, which pairs samples taken side by side and so holds
    up better when each round has one sample and the machine is noisy.
    """

    description: str
    ratio: Ratio
    bound: float
    direction: Literal["at most", "at least"]
    basis: Literal["medians", "rounds"] = "medians"

    def met_by(self, value: float) -> bool:
        """Whether a measured ratio meets the goal."""
        return value <= self.bound if self.direction == "at most" else value >= self.bound

    def value_of(self, measured: RatioValue) -> float:
        """The value of ``measured`` that this target judges."""
        return measured.median if self.basis == "medians" else measured.round_p50


@dataclass(frozen=True)
class TargetOutcome:
    """A target and how it fared; ``value`` is None if it could not be measured."""

    target: Target
    value: float | None

    @property
    def verdict(self) -> str:
        """``met``, ``missed`` or ``not measured``."""
        if self.value is None:
            return "not measured"
        return "met" if self.target.met_by(self.value) else "missed"


def judge(targets: Sequence[Target], ratios: Sequence[RatioValue]) -> list[TargetOutcome]:
    """Check each target against its measured ratio, on the target's basis."""
    measured = {value.ratio: value for value in ratios}
    outcomes = []
    for target in targets:
        value = measured.get(target.ratio)
        outcomes.append(TargetOutcome(target, None if value is None else target.value_of(value)))
    return outcomes


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile of sorted data, interpolating between ranks."""
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
