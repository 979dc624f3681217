"""``python -m benchmarks``: run the scenarios, print and save their results.

By default every registered scenario runs at full size (under ten minutes
in all) and the whole report is printed and written to
``benchmarks/RESULTS.md`` with its plots beside it.  With ``--scenario`` only
the sections of the scenarios run are replaced in ``RESULTS.md``; the others
are kept.  ``--quick`` makes a tiny run, and ``--no-write`` leaves the saved
files alone, so ``python -m benchmarks --quick --no-write`` is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import asyncio_latency, contention, cpus, drain, handoff, latency, memory, plotting, reclaim, report, semaphore
from .machine import Machine, describe
from .scenario import RunOptions, Scenario, ScenarioResult

__all__ = ["SCENARIOS", "main"]

#: Every scenario, by command-line name, in the order they run.
SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        latency.SCENARIO,
        asyncio_latency.SCENARIO,
        handoff.SCENARIO,
        drain.SCENARIO,
        contention.SCENARIO,
        memory.SCENARIO,
        reclaim.SCENARIO,
        semaphore.SCENARIO,
    )
}

#: Where ``RESULTS.md`` and the plots are written.
OUTPUT_DIR = Path(__file__).resolve().parent
RESULTS = OUTPUT_DIR / "RESULTS.md"

DEFAULT_SEED = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks as the command line asks; returns the exit status."""
    args = _parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    options = RunOptions(quick=args.quick, seed=args.seed, layout=args.cpus)
    names = args.scenario or list(SCENARIOS)
    machine = describe()

    results = []
    for name in dict.fromkeys(names):
        scenario = SCENARIOS[name]
        print(f"running {scenario.title} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        results.append(scenario.run(options))
        print(f"  done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    machine = machine.finished()

    text = report.render(results, machine, command, options, plots=plotting.available())
    print(text)
    if not args.no_write:
        if set(names) != set(SCENARIOS) and RESULTS.exists():
            header = report.partial_header(command, machine, options)
            text = report.merge(RESULTS.read_text(), results, header, plots=plotting.available())
        _write(text, results)
    if args.json is not None:
        args.json.write_text(json.dumps(_as_json(results, machine, command, options), indent=1))
        print(f"raw numbers written to {args.json}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark celery_dlock's Redlock against other Redis locks.",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default: all of them)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run, a few seconds per scenario")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help=f"print only: leave {OUTPUT_DIR.name}/RESULTS.md and the plots untouched",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also dump every raw timing to PATH")
    parser.add_argument(
        "--cpus",
        choices=cpus.LAYOUTS,
        default=cpus.LAYOUTS[0],
        help="CPU pinning of the benchmark and its servers (default %(default)s; see benchmarks/cpus.py)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the round order (default {DEFAULT_SEED})",
    )
    return parser


def _write(text: str, results: Sequence[ScenarioResult]) -> None:
    """Save the report and draw the plots, or say why a plot was skipped."""
    RESULTS.write_text(text)
    print(f"report written to {RESULTS}", file=sys.stderr)
    plots = [plot for result in results for plot in result.plots]
    if plots and not plotting.available():
        print(
            "matplotlib is not installed: plots skipped (pip install -e .[bench])",
            file=sys.stderr,
        )
        return
    for plot in plots:
        print(f"plot written to {plotting.draw(plot, OUTPUT_DIR)}", file=sys.stderr)


def _as_json(
    results: Sequence[ScenarioResult],
    machine: Machine,
    command: str,
    options: RunOptions,
) -> dict[str, Any]:
    """Everything measured, timings in nanoseconds per operation, per round."""
    return {
        "command": command,
        "options": asdict(options),
        "machine": asdict(machine),
        "scenarios": [
            {
                "name": result.name,
                "title": result.title,
                "schedule": None if result.schedule is None else asdict(result.schedule),
                "variants": [asdict(row) for row in result.rows],
                "ratios": [asdict(value) for value in result.ratios],
                "targets": [
                    {
                        **asdict(outcome.target),
                        "value": outcome.value,
                        "verdict": outcome.verdict,
                    }
                    for outcome in result.targets
                ],
                "notes": result.notes,
                "tables": [asdict(table) for table in result.tables],
                "timings_ns": result.timings,
            }
            for result in results
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
