"""A description of the machine a run was made on, for the report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import servers

__all__ = ["Machine", "describe"]

_REPO = Path(__file__).resolve().parent.parent

#: The distributions whose versions a report lists.
PACKAGES = (
    "celery-dlock",
    "redis",
    "hiredis",
    "celery",
    "kombu",
    "pottery",
    "python-redis-lock",
    "celery-once",
    "celery-singleton",
    "celery-heimdall",
    "matplotlib",
)


@dataclass(frozen=True)
class Machine:
    """Where, when and on which code a benchmark ran.

    Attributes:
        date: The start of the run, UTC, ISO 8601 to the second.
        cpu: The processor model, as ``/proc/cpuinfo`` names it.
        cores: Logical CPUs in the machine.
        usable_cores: Logical CPUs this process may run on.
        load_average: The 1-, 5- and 15-minute load averages at the start.
        load_average_end: The same at the end, once :meth:`finished` is called;
            a rise means something else ran during the benchmark.
        os: The operating system and kernel.
        python: The interpreter's implementation and version.
        redis_server: The redis-server version and the binary's path.
        packages: Installed versions of the libraries involved, by name.
        revision: The repository's commit, ``-dirty`` if files were modified.

    """

    date: str
    cpu: str
    cores: int
    usable_cores: int
    load_average: tuple[float, float, float]
    os: str
    python: str
    redis_server: str
    packages: dict[str, str]
    revision: str
    load_average_end: tuple[float, float, float] | None = None

    def finished(self) -> Machine:
        """The same description, with the load average at the end filled in."""
        return replace(self, load_average_end=os.getloadavg())


def describe(packages: Sequence[str] = PACKAGES) -> Machine:
    """Describe this machine now; packages not installed are listed as such."""
    return Machine(
        date=_utc_now(),
        cpu=_cpu_model(),
        cores=os.cpu_count() or 0,
        usable_cores=len(os.sched_getaffinity(0)),
        load_average=os.getloadavg(),
        os=platform.platform(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        redis_server=f"{servers.redis_server_version()} ({servers.redis_server_binary()})",
        packages={name: _version(name) for name in packages},
        revision=_revision(),
    )


def _utc_now() -> str:
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=0).isoformat()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or sys.platform


def _revision() -> str:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return described.stdout.strip()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
