"""Markdown for the terminal and for ``RESULTS.md``."""

from __future__ import annotations

from collections.abc import Sequence

from . import cpus
from .machine import Machine
from .scenario import RunOptions, ScenarioResult, TimeUnit
from .stats import TargetOutcome

__all__ = [
    "merge",
    "partial_header",
    "render",
    "render_machine",
    "render_scenario",
    "section_markers",
]


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


def partial_header(command: str, machine: Machine, options: RunOptions) -> str:
    """The line opening a section replaced by a run of some scenarios only."""
    line = (
        f"*Measured by `{command}` on {machine.date}, revision {machine.revision},"
        f" load {_load(machine.load_average)}; the machine table above is from the"
        " page's last full run.*"
    )
    if options.quick:
        line += "  \n**Quick run**: too few samples to trust."
    return line


def render_machine(machine: Machine) -> str:
    """The machine as a two-column table."""
    load = _load(machine.load_average)
    if machine.load_average_end is not None:
        load += f" at the start, {_load(machine.load_average_end)} at the end"
    packages = ", ".join(f"{name} {version}" for name, version in machine.packages.items())
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
    """One scenario: method, tables, ratios, targets, notes and plot links.

    Tables with nothing in them are left out.  The section is wrapped in
    :func:`section_markers`, so that :func:`merge` can replace it alone.
    """
    parts = [f"## {result.title}", result.method.strip()]
    schedule = result.schedule
    if schedule is not None:
        parts.append(
            f"Schedule: {schedule.warmup} warm-up rounds discarded, then {schedule.rounds} rounds;"
            f" each round runs {schedule.batch} operations of every variant in turn, in a new"
            f" random order, for {schedule.samples} samples per variant."
        )
    if result.rows:
        unit = result.unit
        scale, digits = _SCALES[unit]
        parts.append(
            _table(
                "### Latency per operation",
                [
                    "Variant",
                    "Nodes",
                    f"Median ({unit})",
                    f"p99 ({unit})",
                    f"Min ({unit})",
                    "Samples",
                ],
                [
                    [
                        row.label,
                        str(row.nodes),
                        f"{row.stats.median_us / scale:.{digits}f}",
                        f"{row.stats.p99_us / scale:.{digits}f}",
                        f"{row.stats.min_us / scale:.{digits}f}",
                        str(row.stats.samples),
                    ]
                    for row in result.rows
                ],
            )
        )
    parts += [_table(table.heading, table.header, table.rows) for table in result.tables]
    if result.ratios:
        parts.append(_ratios(result))
    if result.targets:
        parts.append(_targets(result.targets))
    if result.notes:
        parts.append("Notes:\n\n" + "\n".join(f"* {note}" for note in result.notes))
    if plots:
        parts += [f"![{plot.title}]({plot.filename})" for plot in result.plots]
    begin, end = section_markers(result.name)
    return "\n\n".join([begin, *parts, end])


def section_markers(name: str) -> tuple[str, str]:
    """The HTML comments around the section of scenario ``name``."""
    return f"<!-- scenario {name} -->", f"<!-- end of scenario {name} -->"


def merge(page: str, results: Sequence[ScenarioResult], header: str, *, plots: bool = True) -> str:
    """``page`` with the sections of ``results`` replaced by fresh ones.

    For a run of some scenarios only: the other sections are kept as they
    were, and each fresh one has ``header`` under its title, saying how and
    when it was measured.  A section missing from ``page`` is added at the end.
    """
    for result in results:
        section = render_scenario(result, plots=plots)
        begin, end = section_markers(result.name)
        title, body = section[len(begin) : -len(end)].strip("\n").split("\n\n", 1)
        section = f"{begin}\n\n{title}\n\n{header}\n\n{body}\n\n{end}"
        start = page.find(begin)
        stop = page.find(end, start)
        if start < 0 or stop < 0:
            page = page.rstrip("\n") + "\n\n" + section + "\n"
        else:
            page = page[:start] + section + page[stop + len(end) :]
    return page


def _targets(outcomes: Sequence[TargetOutcome]) -> str:
    """The targets table; its goal column names the basis each is judged on."""
    bases = {outcome.target.basis for outcome in outcomes}
    goal = f"Goal (on {_BASES[bases.pop()]})" if len(bases) == 1 else "Goal"
    rows = []
    for outcome in outcomes:
        target = outcome.target
        text = f"{target.ratio.label} {target.direction} {target.bound:g}"
        if len(bases) > 1:
            text += f" (on {_BASES[target.basis]})"
        rows.append(
            [
                target.description,
                text,
                "n/a" if outcome.value is None else _times(outcome.value),
                outcome.verdict,
            ]
        )
    return _table("### Targets", ["Target", goal, "Measured", "Verdict"], rows)


#: How the targets table names each basis.
_BASES = {"medians": "medians", "rounds": "the median of same-round ratios"}


def _ratios(result: ScenarioResult) -> str:
    """The ratios table; without the p99 column when tails mean nothing."""
    header = ["Ratio", "Of medians", "Of p99s", "Per round: p10 / p50 / p90"]
    if not result.tail_ratios:
        header.remove("Of p99s")
    rows = []
    for value in result.ratios:
        cells = [value.ratio.label, _times(value.median), _times(value.p99)]
        if not result.tail_ratios:
            cells.pop()
        cells.append(" / ".join(_times(v) for v in (value.round_p10, value.round_p50, value.round_p90)))
        rows.append(cells)
    return _table("### Ratios", header, rows)


#: Microseconds per unit of a latency table, and the decimals printed.
_SCALES: dict[TimeUnit, tuple[float, int]] = {"µs": (1.0, 1), "ms": (1000.0, 2)}


def _table(heading: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [heading, "", _line(header), _line(["---"] * len(header))]
    lines += [_line(row) for row in rows]
    return "\n".join(lines)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _load(averages: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in averages)


def _times(value: float) -> str:
    return f"{value:.2f}x"
