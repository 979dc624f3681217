"""The periodic job: a single-flight task that records each run and its slot."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import shared_task
from django.conf import settings

from celery_dlock import single_flight
from celery_dlock.beat import ENTRY_HEADER, SLOT_HEADER

_tally: tuple[int, redis.Redis] | None = None


def tally() -> redis.Redis:
    """This process's client of the tally (a pool process makes its own after the fork)."""
    global _tally
    if _tally is None or _tally[0] != os.getpid():
        _tally = (os.getpid(), redis.Redis.from_url(settings.DEMO_TALLY_URL))
    return _tally[1]


@shared_task(name="ticks.tick", bind=True)
@single_flight(key="ticks.tick")
def tick(self: Any) -> None:
    """Append ``{"entry", "slot", "pid", "at"}`` to the tally: one item per run.

    The slot is the ``dlock_beat_slot`` header the beat that claimed the run
    put on the message.  ``single_flight`` keeps two runs from overlapping;
    with ``CELERY_DLOCK_ON_BUSY = "skip"`` a second one at the same time is
    dropped.
    """
    run = {
        "entry": getattr(self.request, ENTRY_HEADER, None),
        "slot": getattr(self.request, SLOT_HEADER, None),
        "pid": os.getpid(),
        "at": time.time(),
    }
    tally().rpush(settings.DEMO_TALLY_KEY, json.dumps(run))
