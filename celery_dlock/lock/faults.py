"""Named fault points, for crash tests of the code paths around them.

A fault point does nothing unless its name is listed in the environment
variable ``DLOCK_FAULT_POINTS`` (comma-separated) when this module is first
imported; then the process kills itself there with ``SIGKILL``, as a crash at
exactly that moment would.  Tests use it where a sleep could only make the
timing likely.  The points:

* ``after-acquire``: a lock was just granted, before the caller has it;
* ``mid-extend``: the nodes renewed a lease, the holder has not seen it yet;
* ``before-release``: a holder is about to release;
* ``before-handoff-publish``: a release has reserved the key for the next
  parked message, which is not yet published.

Checking a point that is off costs one set lookup.
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
