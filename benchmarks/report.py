"""Markdown for the terminal and for ``RESULTS.md``."""

from __future__ import annotations

from collections.abc import Sequence

from . import cpus
from .machine import Machine
from .scenario import RunOptions, ScenarioResult

__all__ = ["render", "render_machine", "render_scenario"]


def render(
    results: Sequence[ScenarioResult],
    machine: Machine,
    command: str,
    options: RunOptions,
    *,
    plots: bool = True,
) -> str:
    """The whole report: how it was run, on what, then every scenario.

    With ``plots`` false the scenarios' plots are not linked.
    """
    lines = [
        "# celery_dlock benchmarks",
        "",
        f"Command: `{command}` (from the repository root)  ",
        f"Date: {machine.date}  ",
        f"Round-order seed: {options.seed}  ",
        (
            f"CPU layout: `{options.layout}`, {cpus.describe(options.layout)}"
            " (multi-node results depend on it: see `--cpus` in `benchmarks/cpus.py`)"
        ),
    ]
    if options.quick:
        lines += [
            "",
            "**Quick run**: too few samples to trust; run without `--quick` for numbers.",
        ]
    parts = ["\n".join(lines), render_machine(machine)]
    parts += [render_scenario(result, plots=plots) for result in results]
    return "\n\n".join(parts) + "\n"


def render_machine(machine: Machine) -> str:
    """The machine as a two-column table."""
    load = _load(machine.load_average)
    if machine.load_average_end is not None:
        load += f" at the start, {_load(machine.load_average_end)} at the end"
    packages = ", ".join(
        f"{name} {version}" for name, version in machine.packages.items()
    )
    return _table(
        "## Machine",
        ["", ""],
        [
            [
                "CPU",
                f"{machine.cpu}: {machine.cores} logical CPUs, {machine.usable_cores} usable",
            ],
            ["Load average (1/5/15 min)", load],
            ["OS", machine.os],
            ["Python", machine.python],
            ["redis-server", machine.redis_server],
            ["Packages", packages],
            ["Code revision", machine.revision],
        ],
    )


def render_scenario(result: ScenarioResult, *, plots: bool = True) -> str:
    """One scenario: method, variants, ratios, targets, notes and plot links."""
    schedule = result.schedule
    parts = [
        f"## {result.title}",
        result.method.strip(),
        (
            f"Schedule: {schedule.warmup} warm-up rounds discarded, then {schedule.rounds} rounds;"
            f" each round runs {schedule.batch} operations of every variant in turn, in a new"
            f" random order, for {schedule.samples} samples per variant."
        ),
        _table(
            "### Latency per operation",
            ["Variant", "Nodes", "Median (µs)", "p99 (µs)", "Min (µs)", "Samples"],
            [
                [
                    row.label,
                    str(row.nodes),
                    _us(row.stats.median_us),
                    _us(row.stats.p99_us),
                    _us(row.stats.min_us),
                    str(row.stats.samples),
                ]
                for row in result.rows
            ],
        ),
        _table(
            "### Ratios",
            ["Ratio", "Of medians", "Of p99s", "Per round: p10 / p50 / p90"],
            [
                [
                    value.ratio.label,
                    _times(value.median),
                    _times(value.p99),
                    " / ".join(
                        _times(v)
                        for v in (value.round_p10, value.round_p50, value.round_p90)
                    ),
                ]
                for value in result.ratios
            ],
        ),
        _table(
            "### Targets",
            ["Target", "Goal (on medians)", "Measured", "Verdict"],
            [
                [
                    outcome.target.description,
                    f"{outcome.target.ratio.label} {outcome.target.direction} {outcome.target.bound:g}",
                    "n/a" if outcome.value is None else _times(outcome.value),
                    outcome.verdict,
                ]
                for outcome in result.targets
            ],
        ),
    ]
    if result.notes:
        parts.append("Notes:\n\n" + "\n".join(f"* {note}" for note in result.notes))
    if plots:
        parts += [f"![{plot.title}]({plot.filename})" for plot in result.plots]
    return "\n\n".join(parts)


def _table(heading: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [heading, "", _line(header), _line(["---"] * len(header))]
    lines += [_line(row) for row in rows]
    return "\n".join(lines)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _load(averages: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in averages)


def _us(value: float) -> str:
    return f"{value:.1f}"


def _times(value: float) -> str:
    return f"{value:.2f}x"
