"""``celery_dlock.beat:ClaimingScheduler``: the scheduler ``dlock_beat_scheduler`` names, claiming.

Two real ``celery -A beat_app beat -S celery_dlock.beat:ClaimingScheduler``
over redbeat's ``RedBeatScheduler`` (``celery-redbeat``), whose entries live
in Redis next to the claims; one is killed with SIGKILL in the middle of the
run, and each slot must still run exactly once, with none missing.  redbeat's
own leader lock must never be taken.  A missing or bad ``dlock_beat_scheduler``
stops the beat at start, naming the setting.  The beats, services, worker
and checks are ``test_beat``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.beat import PersistentScheduler, Scheduler
from test_beat import Beat, BeatGroup, Services, beat_group, services, ts, two_beats_one_killed, worker

from celery_dlock import ConfigurationError
from celery_dlock.beat import MultiBeatMixin, MultiBeatScheduler, claiming_scheduler
from celery_dlock.beat.schedulers import RedBeatClaims

redbeat = pytest.importorskip("redbeat")

__all__ = ["beat_group", "services", "worker"]  # the fixtures, shared with test_beat

CLAIMING = "celery_dlock.beat:ClaimingScheduler"
ENTRY = "every-second"


@pytest.mark.worker
def test_redbeat_beats_publish_each_tick_once_across_a_kill(
    beat_group: Callable[..., BeatGroup], services: Services
) -> None:
    """Two redbeat beats, both active; SIGKILL the one that sent the latest tick, halfway."""
    group = beat_group(
        DLOCK_TEST_BEAT_SCHEDULE="ticks", DLOCK_TEST_WRAPPED_SCHEDULER="redbeat.schedulers:RedBeatScheduler"
    )
    group.beat_options = {"scheduler": CLAIMING}
    prefix = f"dlock:{group.run}:redbeat:"
    beats, _ = two_beats_one_killed(group, ENTRY, r"beat: ClaimingRedBeatScheduler; claims on")
    for beat in beats:  # redbeat logs "beat: Acquired lock" once it holds it, and releases it on close
        assert "is not taken: every beat is active" in beat.log and "Acquired lock" not in beat.log, beat.log_tail()
    assert not services.locks.exists(f"{prefix}:lock")
    # redbeat's own record of the entry, in Redis, is the last slot sent.
    meta = json.loads(services.locks.hget(f"{prefix}{ENTRY}", "meta"), cls=redbeat.decoder.RedBeatJSONDecoder)
    sent = sorted(slot for beat in beats for slot in beat.sent(ENTRY))
    assert meta["last_run_at"].timestamp() == ts(sent[-1])


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "dlock_beat_scheduler is not set"),
        ("celery.beat.PersistentScheduler", 'dlock_beat_scheduler: expected "module:Class"'),
        ("no_such_module:Scheduler", "dlock_beat_scheduler: cannot import 'no_such_module:Scheduler'"),
        (
            "celery.beat:ScheduleEntry",
            "dlock_beat_scheduler: 'celery.beat:ScheduleEntry' is not a celery.beat.Scheduler",
        ),
    ],
)
def test_a_missing_or_bad_setting_stops_the_beat(
    services: Services, tmp_path: Path, value: str | None, says: str
) -> None:
    env = {"DLOCK_TEST_WRAPPED_SCHEDULER": value} if value else {}
    beat = Beat("refused", cwd=tmp_path, env=services.env(**env), scheduler=CLAIMING)
    beat.start()
    try:
        assert beat.wait(timeout=60) != 0
    finally:
        beat.kill()
    assert says in beat.log, beat.log_tail()


def test_the_class_built_for_each_kind_of_scheduler() -> None:
    class OwnPersistent(PersistentScheduler):  # type: ignore[misc]
        pass

    assert claiming_scheduler(PersistentScheduler) is MultiBeatScheduler
    assert claiming_scheduler(MultiBeatScheduler) is MultiBeatScheduler
    own = claiming_scheduler(OwnPersistent)
    assert own.__mro__[1:3] == (MultiBeatScheduler, MultiBeatMixin) and issubclass(own, OwnPersistent)
    built = claiming_scheduler(redbeat.RedBeatScheduler)
    assert built.__name__ == "ClaimingRedBeatScheduler" and built.__mro__[1] is RedBeatClaims
    assert claiming_scheduler(redbeat.RedBeatScheduler) is built  # built once
    plain = claiming_scheduler(Scheduler)
    assert plain.__mro__[1] is MultiBeatMixin
    with pytest.raises(ConfigurationError, match="dlock_beat_scheduler"):
        claiming_scheduler(dict)  # type: ignore[arg-type]
