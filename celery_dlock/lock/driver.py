"""The sync driver of :mod:`~celery_dlock.lock.plans`: a plan's requests carried out on this thread.

A :class:`~celery_dlock.lock.plans.Fan` goes through
:func:`~celery_dlock.lock.fanout.fan_out`, a
:class:`~celery_dlock.lock.plans.Listen` opens a
:class:`~celery_dlock.lock.waiting.ReleaseWaiter`, and a
:class:`~celery_dlock.lock.plans.Pause` waits on it (or sleeps).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TypeVar

from .fanout import fan_out
from .member import Member
from .plans import Done, Fan, Listen, Plan, advance
from .waiting import ReleaseWaiter

__all__ = ["run"]

T = TypeVar("T")


def run(plan: Plan[T], nodes: Sequence[Member], *, timeout: float) -> T:
    """Carry out ``plan`` over ``nodes`` (``timeout``: seconds for any one node) and return its outcome."""
    waiter: ReleaseWaiter | None = None
    answer: Any = None
    try:
        while not isinstance(request := advance(plan, answer), Done):
            if isinstance(request, Fan):
                calls = [(nodes[i], request.command) for i in request.targets]
                answer = fan_out(calls, decided=request.decided, timeout=timeout)
            elif isinstance(request, Listen):
                waiter = ReleaseWaiter.subscribe(nodes, request.channel)
                answer = waiter is not None
            elif waiter is not None:
                answer = waiter.wait(request.delay)
            else:
                time.sleep(request.delay)
                answer = None
        return request.value
    finally:
        if waiter is not None:
            waiter.close()
