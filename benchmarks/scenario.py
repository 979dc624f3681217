"""What a scenario is, and the result it hands to the report and the plots."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .cpus import Layout
from .harness import Schedule, Timings, Variant
from .stats import (
    Ratio,
    RatioValue,
    Stats,
    Target,
    TargetOutcome,
    evaluate,
    judge,
    summarize,
)

__all__ = [
    "LinePlot",
    "Row",
    "RunOptions",
    "Scenario",
    "ScenarioResult",
    "Table",
    "TimeUnit",
    "build_result",
    "medians_by_nodes",
]

#: The unit a scenario's latency table is printed in.
TimeUnit = Literal["µs", "ms"]


@dataclass(frozen=True)
class RunOptions:
    """How big a run to make, where it runs, and the seed of its round order."""

    quick: bool
    seed: int
    layout: Layout

    def rng(self) -> random.Random:
        """A fresh random source seeded with :attr:`seed`."""
        return random.Random(self.seed)


@dataclass(frozen=True)
class Scenario:
    """A registered benchmark: its command-line name, its title, its runner."""

    name: str
    title: str
    run: Callable[[RunOptions], ScenarioResult]


@dataclass(frozen=True)
class Row:
    """One line of a scenario's table: a variant and its statistics."""

    key: str
    label: str
    family: str
    nodes: int
    stats: Stats


@dataclass(frozen=True)
class Table:
    """A table of a scenario's own, already formatted as text.

    Attributes:
        heading: Its markdown heading, such as ``### Throughput``.
        header: The column names.
        rows: The cells, one list of strings per row.

    """

    heading: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class LinePlot:
    """A plot to draw, as data: one line per series, x mapped to y.

    Attributes:
        filename: The PNG's name, written beside ``RESULTS.md``.
        title: The plot's title.
        x_label: The x axis label.
        y_label: The y axis label.
        series: For each legend entry, its points as x -> y.
        log_y: Whether the y axis is logarithmic.

    """

    filename: str
    title: str
    x_label: str
    y_label: str
    series: Mapping[str, Mapping[int, float]]
    log_y: bool = False


@dataclass(frozen=True)
class ScenarioResult:
    """Everything a scenario measured, ready to print, plot or dump.

    Attributes:
        name: The scenario's command-line name.
        title: Its heading.
        method: A markdown paragraph saying what was timed and how.
        schedule: The rounds and batches that were run, or ``None`` when the
            method describes a schedule of the scenario's own.
        rows: The latency table, one row per variant that ran; may be empty.
        ratios: Ratios between variants, skipping those not run.
        targets: The goals and whether they were met.
        notes: Remarks for the reader, such as skipped variants.
        plots: Plots to draw.
        timings: The raw per-operation times, by variant key.
        tables: Tables of the scenario's own, printed after the latency table.
        unit: The unit of the latency table.
        tail_ratios: Whether ratios of p99s mean anything: not when each
            variant has only a sample or a few per round.

    """

    name: str
    title: str
    method: str
    schedule: Schedule | None
    rows: list[Row]
    ratios: list[RatioValue]
    targets: list[TargetOutcome]
    notes: list[str] = field(default_factory=list)
    plots: list[LinePlot] = field(default_factory=list)
    timings: Mapping[str, Timings] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    unit: TimeUnit = "µs"
    tail_ratios: bool = True


def build_result(
    *,
    scenario: Scenario,
    method: str,
    schedule: Schedule | None,
    variants: Sequence[Variant],
    timings: Mapping[str, Timings],
    ratios: Sequence[Ratio],
    targets: Sequence[Target],
    notes: Sequence[str] = (),
    tables: Sequence[Table] = (),
    unit: TimeUnit = "µs",
    rows: bool = True,
    tail_ratios: bool = True,
) -> ScenarioResult:
    """Summarize ``timings`` into a :class:`ScenarioResult` (without plots).

    With ``rows`` false the latency table is left out: for scenarios whose
    samples are not latencies (a drain time per task, say) and which print
    ``tables`` of their own instead.
    """
    table = [
        Row(v.key, v.label, v.family, v.nodes, summarize(timings[v.key]))
        for v in variants
        if rows and timings.get(v.key)
    ]
    measured = [value for value in (evaluate(r, timings) for r in ratios) if value is not None]
    return ScenarioResult(
        name=scenario.name,
        title=scenario.title,
        method=method,
        schedule=schedule,
        rows=table,
        ratios=measured,
        targets=judge(targets, measured),
        notes=list(notes),
        timings=dict(timings),
        tables=list(tables),
        unit=unit,
        tail_ratios=tail_ratios,
    )


def medians_by_nodes(rows: Sequence[Row], families: Mapping[str, str]) -> dict[str, dict[int, float]]:
    """Median microseconds against node count, for a :class:`LinePlot`.

    ``families`` maps each family to plot to its legend label; families with
    no rows are left out.
    """
    series: dict[str, dict[int, float]] = {}
    for family, legend in families.items():
        points = {row.nodes: row.stats.median_us for row in rows if row.family == family}
        if points:
            series[legend] = dict(sorted(points.items()))
    return series
