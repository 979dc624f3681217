"""Named fault points, for crash tests of the code paths around them.

A fault point does nothing unless its name is listed in the environment
variable ``DLOCK_FAULT_POINTS`` (comma-separated) when this module is first
imported; then the process kills itself there with ``SIGKILL``, as a crash at
exactly that moment would.  Tests use it where a sleep could only make the
timing likely: for instance ``before-handoff-publish`` dies after a release
has reserved the key for the next parked message, before that message is
published.
"""

from __future__ import annotations

import os
import signal
from typing import Final

__all__ = ["ENV_VAR", "fault_point"]

ENV_VAR: Final = "DLOCK_FAULT_POINTS"

_ACTIVE: Final = frozenset(name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip())


def fault_point(name: str) -> None:
    """Die here, with SIGKILL, if the fault point ``name`` is switched on."""
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
