"""Every benchmark scenario still runs, at its quick size.

Nothing here asserts a timing: speed is reported by ``python -m benchmarks``,
as ratios measured side by side.  This only keeps the scenarios working, and
checks that a quick run leaves the committed results page alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("latency", "asyncio", "handoff", "drain", "contention", "memory", "reclaim")


def test_every_scenario_runs_at_quick_size(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    raw = tmp_path / "raw.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-write", "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for scenario in SCENARIOS:
        assert f"<!-- scenario {scenario} -->" in run.stdout, scenario
    assert json.loads(raw.read_text()), "the raw timings were written"
    assert results.read_bytes() == before, "--no-write must leave RESULTS.md alone"
