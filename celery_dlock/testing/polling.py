"""Waiting for a condition: the one poll loop of the testing helpers.

:func:`wait_until` is what every helper here waits with (a redis-server to
answer, a worker to log ``ready``, a run to take a lock), and what a test
suite can wait with too, instead of a fixed sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``predicate`` is called at once, then every ``interval`` seconds, and a
    last time once ``timeout`` seconds have passed.  ``message`` names what is
    awaited; a callable is only called on a timeout, so it may read logs.

    Raises:
        AssertionError: ``predicate`` was still falsy after ``timeout`` seconds.

    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s waiting for {text}")
        time.sleep(interval)
