"""Where the benchmark and its redis-servers run: CPU affinity layouts.

On a small virtual machine the cost of a loopback round trip depends on
whether client and server share a CPU: waking a process on another CPU costs
tens of microseconds more.  Left to the scheduler, that placement changes
during a run, and so do the results, in jumps.  Pinning makes it fixed:

* ``split`` (the default): the benchmark on the first usable CPU, the
  servers spread over the others.  Every round trip crosses CPUs, as it
  crosses a network in production, and the servers never take CPU time
  from the client.
* ``one-cpu``: everything on the first usable CPU.  The steadiest numbers,
  but client and servers take turns, so N nodes cost N times the server work.
* ``os``: no pinning; the scheduler decides.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

__all__ = ["LAYOUTS", "Layout", "describe", "pinned"]

Layout = Literal["split", "one-cpu", "os"]

#: The layouts, the default first.
LAYOUTS: tuple[Layout, ...] = get_args(Layout)


def describe(layout: Layout) -> str:
    """One line saying what ``layout`` does on this machine."""
    usable = sorted(os.sched_getaffinity(0))
    if layout == "os" or (layout == "split" and len(usable) < 2):
        return "not pinned: the scheduler places the benchmark and the servers"
    if layout == "one-cpu":
        return f"benchmark and servers all pinned to CPU {usable[0]}"
    rest = ", ".join(map(str, usable[1:]))
    return f"benchmark pinned to CPU {usable[0]}, servers to CPU {rest} (round-robin)"


@contextmanager
def pinned(layout: Layout, server_pids: Sequence[int]) -> Iterator[None]:
    """Pin this thread and the server processes for the ``with`` block.

    This thread's affinity is restored on exit, and threads it starts inside
    the block inherit the pinning.  A ``split`` layout on a single usable CPU
    pins nothing.
    """
    before = os.sched_getaffinity(0)
    usable = sorted(before)
    if layout == "one-cpu":
        own, others = usable[:1], usable[:1]
    elif layout == "split" and len(usable) >= 2:
        own, others = usable[:1], usable[1:]
    else:
        yield
        return
    for index, pid in enumerate(server_pids):
        os.sched_setaffinity(pid, {others[index % len(others)]})
    os.sched_setaffinity(0, own)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
