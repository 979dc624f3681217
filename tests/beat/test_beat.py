"""``celery_dlock.beat.MultiBeatScheduler`` and ``single_flight(hold=...)``.

Most tests run real ``celery -A beat_app beat -S celery_dlock.beat:MultiBeatScheduler``
processes, two or three at once in one working directory (so they also share
the default schedule file name), and one real prefork ``celery worker``.
Every periodic run records its entry and slot (the ``dlock_beat_*`` message
headers) in a Redis list; every beat logs each slot it handled, as
``Sending due task <entry> (...) for <slot>`` or ``<entry> for <slot> already
claimed by ...``.  The tests check that each slot ran exactly once, that the
beats' sends are disjoint and add up to the runs, and that each beat's own
shelve file agrees with what it handled.

Time is driven through ``beat_app``'s clock settings, for the beats only: a
clock offset (a minute boundary in the middle of a short run; two beats with
different clocks) and, for crontabs, a clock running 120 times as fast, so
that a minute passes every half second.

The slot arithmetic, the per-instance files, failing closed while Redis is
down and the exact clock-skew bound are tested in-process, against real
redis-servers, with schedulers whose publishing is recorded.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shelve
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.schedules import crontab, schedule
from support.apps import app_environment
from support.paths import import_path
from support.redis_servers import RedisServer
from support.workers import CeleryWorker

from celery_dlock import ConfigurationError, Redlock
from celery_dlock.beat import SLOT_HEADER, STALL_ALLOWANCE, MultiBeatScheduler, Slot, locate
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.process import ManagedProcess, log_tails, python_environment

BEAT_DIR = Path(__file__).resolve().parent
SCHEDULER = "celery_dlock.beat:MultiBeatScheduler"
UTC = timezone.utc

SENT = re.compile(r"Scheduler: Sending due task (\S+) \(\S+\) for (\S+)")
TAKEN = re.compile(r"Scheduler: (\S+) for (\S+) already claimed by")
SCHEDULE_FILE = re.compile(r"beat: schedule file (\S+);")


# -- beats -------------------------------------------------------------------------------


class Beat(ManagedProcess):
    """One ``python -m celery -A beat_app beat`` with the multi-beat scheduler, in its own session.

    ``app`` and ``scheduler`` run another app, or another ``-S`` (none: the app's own ``beat_scheduler``).
    """

    def __init__(
        self, name: str, *, cwd: Path, env: dict[str, str], app: str = "beat_app", scheduler: str | None = SCHEDULER
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "beat",
            *(["-S", scheduler] if scheduler else []),
            "-l",
            "INFO",
        ]
        super().__init__(command, log_path=cwd / f"{name}.log", cwd=cwd, env=env, name=name)
        self.cwd = cwd
        self.schedule_file: str | None = None

    def wait_ready(self) -> Beat:
        self.schedule_file = self.wait_for_log(SCHEDULE_FILE, timeout=30).group(1)
        return self

    def sent(self, entry: str) -> list[str]:
        return [slot for name, slot in SENT.findall(self.log) if name == entry]

    def taken(self, entry: str) -> list[str]:
        return [slot for name, slot in TAKEN.findall(self.log) if name == entry]

    def handled(self, entry: str) -> list[str]:
        return self.sent(entry) + self.taken(entry)

    def stored(self, entry: str) -> Any:
        """The entry as this beat's schedule file has it (read after a clean stop)."""
        assert self.schedule_file is not None
        with shelve.open(str(self.cwd / self.schedule_file), flag="r") as db:
            return db["entries"][entry]


# -- fixtures --------------------------------------------------------------------------


class Services:
    """One redis-server: broker and results in db 0, locks in db 1, records in db 2."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        base = server.url.rsplit("/", 1)[0]
        self.broker_url = f"{base}/0"
        self.lock_url = f"{base}/1"
        self.recorder_url = f"{base}/2"
        self.recorder = redis.Redis.from_url(self.recorder_url)
        self.locks = redis.Redis.from_url(self.lock_url)

    def env(self, **extra: Any) -> dict[str, str]:
        """The environment of a beat: the import path of ``beat_app``, the URLs and ``extra``."""
        urls = app_environment(
            broker_url=self.broker_url, lock_urls=[self.lock_url], recorder_url=self.recorder_url, **extra
        )
        return python_environment(import_path(BEAT_DIR), urls)

    def records(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.recorder.lrange(key, 0, -1)]


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    with RedisServer() as server:
        found = Services(server)
        yield found
        found.recorder.close()
        found.locks.close()


@pytest.fixture(scope="module")
def worker(services: Services) -> Iterator[CeleryWorker]:
    """One prefork worker running ``beat_app``'s tasks, for the whole module."""
    worker = CeleryWorker(
        broker_url=services.broker_url,
        lock_urls=[services.lock_url],
        recorder_url=services.recorder_url,
        app_module="beat_app",
        app_dir=BEAT_DIR,
        env={"DLOCK_TEST_BEAT_SCHEDULE": ""},
        concurrency=4,
        name=f"beatw{uuid.uuid4().hex[:8]}",
        startup_timeout=60,
    )
    try:
        yield worker.start()
    finally:
        worker.close()


class BeatGroup:
    """Beats of one test: one working directory, one run id, one clock setup."""

    def __init__(self, services: Services, cwd: Path, **env: Any) -> None:
        self.services = services
        self.cwd = cwd
        self.run = uuid.uuid4().hex[:10]
        # Claims outlive their beats: each test keeps its own.
        self.env = {"DLOCK_TEST_RUN": self.run, "DLOCK_TEST_KEY_PREFIX": f"dlock:{self.run}:", **env}
        self.beats: list[Beat] = []
        #: More arguments of every :class:`Beat`: another ``app`` or ``scheduler``.
        self.beat_options: dict[str, Any] = {}

    def start(self, name: str, **env: Any) -> Beat:
        beat = Beat(name, cwd=self.cwd, env=self.services.env(**{**self.env, **env}), **self.beat_options)
        self.beats.append(beat)
        return beat.start()

    def start_many(self, n: int, stagger: float = 0.4, **env: Any) -> list[Beat]:
        started = []
        for i in range(n):
            if i:
                time.sleep(stagger)  # beats that start at different times must agree
            started.append(self.start(f"beat{len(self.beats) + 1}", **env))
        for beat in started:
            beat.wait_ready()
        return started

    def stop(self) -> None:
        for beat in self.beats:  # SIGTERM: a beat syncs its schedule file and exits
            beat.send_signal(signal.SIGTERM)
        for beat in self.beats:
            beat.stop(timeout=15)

    def records(self) -> list[dict[str, Any]]:
        return self.services.records(f"ticks:{self.run}")

    def logs(self) -> str:
        return log_tails(self.beats, 15)


@pytest.fixture
def beat_group(services: Services, worker: CeleryWorker, tmp_path: Path) -> Iterator[Callable[..., BeatGroup]]:
    groups: list[BeatGroup] = []

    def make(**env: Any) -> BeatGroup:
        group = BeatGroup(services, tmp_path, **env)
        groups.append(group)
        return group

    yield make
    for group in groups:
        group.stop()
    assert worker.running, worker.log_tail()


# -- time --------------------------------------------------------------------------------


def iso(ts: float) -> str:
    return Slot("x", datetime.fromtimestamp(ts, UTC), datetime.fromtimestamp(ts, UTC)).id


def ts(slot: str) -> float:
    return datetime.strptime(slot, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def sleep_until(clock: Callable[[], float], target: float) -> None:
    """Sleep until ``clock()`` reaches ``target``, on a clock that may run fast."""
    while (left := target - clock()) > 0:
        time.sleep(min(left, 0.05))


def offset_clock(offset: float) -> Callable[[], float]:
    return lambda: time.time() + offset


# -- what the runs and the logs must show -----------------------------------------------


def check_exactly_once(group: BeatGroup, entry: str, expected: list[float]) -> Counter[str]:
    """Each expected slot ran once, nothing ran twice, and the beats' sends add up."""
    sent = [slot for beat in group.beats for slot in beat.sent(entry)]
    wait_until(
        lambda: set(sent) <= {r["slot"] for r in group.records() if r["entry"] == entry},
        15,
        interval=0.05,
        message=f"the worker to run every {entry} sent",
    )
    time.sleep(0.3)  # a run published twice would have arrived by now too
    runs = Counter(r["slot"] for r in group.records() if r["entry"] == entry)
    doubled = {slot: n for slot, n in runs.items() if n > 1}
    assert not doubled, f"{entry}: slots that ran more than once: {doubled}\n{group.logs()}"
    missing = [iso(slot) for slot in expected if iso(slot) not in runs]
    assert not missing, f"{entry}: slots that never ran: {missing}\n{group.logs()}"
    assert len(sent) == len(set(sent)), f"{entry}: a slot was sent by two beats: {Counter(sent).most_common(3)}"
    assert set(sent) == set(runs), f"{entry}: runs {sorted(runs)} but sends {sorted(sent)}"
    return runs


def check_bookkeeping(beat: Beat, entry: str, step: float, *, fresh: bool = True) -> list[float]:
    """A beat handled consecutive slots once each, and its schedule file says so."""
    handled = sorted(ts(slot) for slot in beat.handled(entry))
    assert handled, f"{beat.name} handled no {entry} slot:\n{beat.log_tail(30)}"
    assert len(handled) == len(set(handled)), f"{beat.name} handled a {entry} slot twice"
    gaps = [(iso(a), iso(b)) for a, b in itertools.pairwise(handled) if b - a != step]
    assert not gaps, f"{beat.name} skipped {entry} slots: {gaps}\n{beat.log_tail(30)}"
    stored = beat.stored(entry)
    assert stored.last_run_at.timestamp() == handled[-1], (beat.name, stored.last_run_at, iso(handled[-1]))
    if fresh:
        assert stored.total_run_count == len(handled), (beat.name, stored.total_run_count, len(handled))
    else:
        assert stored.total_run_count >= len(handled), (beat.name, stored.total_run_count, len(handled))
    return handled


def two_beats_one_killed(
    group: BeatGroup, entry: str, ready: str, seconds: int = 14
) -> tuple[list[Beat], Counter[str]]:
    """Two beats; SIGKILL the one that sent the latest ``entry`` run, halfway; each slot ran once.

    ``ready`` is what a beat logs once it has set up its schedule.  Returns
    the beats (the victim first) and the runs per slot.
    """
    beats = [group.start(f"beat{n}") for n in (1, 2)]
    for beat in beats:
        beat.wait_for_log(ready, timeout=60)
    first = math.floor(time.time()) + 2
    last = first + seconds

    sleep_until(time.time, first + seconds / 2 - 0.5)  # mid-slot
    victim = max(beats, key=lambda beat: max(beat.sent(entry), default=""))
    assert victim.sent(entry), f"no beat has sent anything yet:\n{group.logs()}"
    victim.kill()
    killed_at = time.time()
    survivor = next(beat for beat in beats if beat is not victim)

    sleep_until(time.time, last + 0.5)
    group.stop()
    runs = check_exactly_once(group, entry, [first + i for i in range(last - first + 1)])
    assert all(ts(slot) <= killed_at for slot in victim.sent(entry)), "the killed beat sent after its death"
    assert any(ts(slot) > killed_at for slot in survivor.sent(entry)), "the survivor sent nothing after the kill"
    return [victim, survivor], runs


# -- real beats --------------------------------------------------------------------------


@pytest.mark.worker
@pytest.mark.parametrize("n_beats", [2, 3])
def test_beats_publish_each_tick_once(beat_group: Callable[..., BeatGroup], n_beats: int) -> None:
    """N beats, a 1 s interval entry for 20 ticks and a minutely crontab: each runs once.

    The beats' clocks are moved so that a minute boundary falls about ten
    seconds into the run, which the crontab entry must run once at.
    """
    launched = time.time()
    minute = math.ceil((launched + 15) / 60) * 60
    offset = minute - (launched + 15)  # the beats' clock reaches `minute` 15 s from now
    clock = offset_clock(offset)
    group = beat_group(DLOCK_TEST_BEAT_SCHEDULE="ticks", DLOCK_TEST_CLOCK_OFFSET=f"{offset:.6f}")
    beats = group.start_many(n_beats)
    assert len({beat.schedule_file for beat in beats}) == n_beats, "two beats share a schedule file"

    first = math.floor(clock()) + 2
    last = first + 19
    assert first <= minute <= last, f"the beats took too long to start: {first=} {minute=}"
    sleep_until(clock, last + 0.5)
    group.stop()

    check_exactly_once(group, "every-second", [first + i for i in range(20)])
    cron_runs = check_exactly_once(group, "every-minute", [minute])
    assert list(cron_runs) == [iso(minute)]
    senders = [beat.name for beat in beats if beat.sent("every-second")]
    assert len(senders) >= 2, f"only {senders} ever won a slot; the others did nothing:\n{group.logs()}"
    for beat in beats:
        check_bookkeeping(beat, "every-second", 1.0)


@pytest.mark.worker
def test_crontab_driven_fast(beat_group: Callable[..., BeatGroup]) -> None:
    """Three beats whose clock runs 120x: 20 minutes of two crontabs in 10 s, each run once."""
    origin = time.time()
    speed = 120.0
    clock = lambda: origin + speed * (time.time() - origin)  # noqa: E731
    group = beat_group(
        DLOCK_TEST_BEAT_SCHEDULE="cron", DLOCK_TEST_CLOCK_SPEED=speed, DLOCK_TEST_CLOCK_ORIGIN=f"{origin:.6f}"
    )
    beats = group.start_many(3, stagger=0.2)

    first = math.ceil(clock() / 60) * 60 + 60
    last = first + 20 * 60
    # 90 clock seconds are 0.75 s here: time for a beat whose loop sleeps
    # 0.2 s to reach the last slot on a loaded machine (later slots may run
    # too; only the expected ones are checked).
    sleep_until(clock, last + 90)
    group.stop()

    check_exactly_once(group, "cron-minute", [first + 60 * i for i in range(21)])
    fives = [m for m in range(int(first), int(last) + 1, 60) if m % 300 == 0]
    check_exactly_once(group, "cron-5-minutes", fives)
    for beat in beats:
        check_bookkeeping(beat, "cron-minute", 60.0)


@pytest.mark.worker
def test_killed_beat_loses_and_doubles_nothing(beat_group: Callable[..., BeatGroup], services: Services) -> None:
    """kill -9 the beat that sent the last tick, halfway; a new beat takes its file later."""
    group = beat_group(DLOCK_TEST_BEAT_SCHEDULE="ticks")
    beats = group.start_many(3)
    first = math.floor(time.time()) + 2
    last = first + 21

    sleep_until(time.time, first + 8.5)  # mid-slot
    victim = max(beats, key=lambda beat: max(beat.sent("every-second"), default=""))
    victim_sent = victim.sent("every-second")
    assert victim_sent, f"no beat has sent anything yet:\n{group.logs()}"
    victim.kill()
    killed_at = time.time()

    sleep_until(time.time, first + 12.3)
    replacement = group.start("replacement").wait_ready()
    assert replacement.schedule_file == victim.schedule_file, "the killed beat's file was not free again"
    replaced_at = time.time()

    sleep_until(time.time, last + 0.5)
    group.stop()

    check_exactly_once(group, "every-second", [first + i for i in range(last - first + 1)])
    assert all(ts(slot) <= killed_at for slot in victim.sent("every-second"))
    survivors = [beat for beat in beats if beat is not victim]
    for beat in survivors:
        check_bookkeeping(beat, "every-second", 1.0)
    # The replacement read the victim's stale schedule file: it caught up with
    # the current slot only, never with the slots it had missed.
    handled = check_bookkeeping(replacement, "every-second", 1.0, fresh=False)
    assert handled[0] >= math.floor(replaced_at) - 1, (iso(handled[0]), replaced_at)


@pytest.mark.worker
def test_clock_skew_within_tolerance(beat_group: Callable[..., BeatGroup]) -> None:
    """Two beats 3 s apart with dlock_beat_max_skew=3: each tick still runs once."""
    skew = 3.0
    group = beat_group(DLOCK_TEST_BEAT_SCHEDULE="ticks", DLOCK_TEST_MAX_SKEW=skew)
    behind = group.start("behind").wait_ready()
    ahead = group.start("ahead", DLOCK_TEST_CLOCK_OFFSET=skew).wait_ready()

    # `ahead` starts with the slot after its own (3 s fast) clock's; `behind`
    # handles the slots before that alone.
    first = math.floor(time.time() + skew) + 2
    last = first + 12  # on the clock of `behind`, the test's own
    sleep_until(time.time, last + 0.5)
    group.stop()

    # `ahead` reaches every slot 3 s before `behind` and sends it; `behind`
    # gets there with the claim still in place, and sends nothing.
    window = [first + i for i in range(last - first + 1)]
    check_exactly_once(group, "every-second", window)
    assert {iso(slot) for slot in window} <= set(ahead.sent("every-second"))
    assert {iso(slot) for slot in window} <= set(behind.taken("every-second"))
    check_bookkeeping(behind, "every-second", 1.0)
    check_bookkeeping(ahead, "every-second", 1.0)


@pytest.mark.worker
def test_hold_runs_one_tick_once(services: Services, worker: CeleryWorker) -> None:
    """``single_flight(hold=2)``: two publishes of a tick run once; the next period runs."""
    hold = 2.0  # beat_app.HOLD: the worker has no DLOCK_TEST_HOLD
    run = uuid.uuid4().hex[:10]
    app = Celery("sender", broker=services.broker_url, backend=services.broker_url, set_as_current=False)

    def send() -> Any:
        return app.send_task("beat_app.held", kwargs={"run": run})

    def outcome(result: Any) -> str:
        value = result.get(timeout=15, propagate=False)
        result.forget()
        return "ran" if value == "ran" else type(value).__name__

    period_start = (math.floor(time.time() / hold) + 1) * hold
    sleep_until(time.time, period_start + 0.05)
    # The same tick published twice at once...
    first, second = send(), send()
    together = sorted([outcome(first), outcome(second)])
    # ... and a third time after the first run ended (it was quick).
    late = outcome(send())
    assert time.time() < period_start + hold, "the test was too slow for its period"
    sleep_until(time.time, period_start + hold + 0.05)
    next_period = outcome(send())

    assert together == ["TaskSkipped", "ran"]
    assert late == "TaskSkipped"
    assert next_period == "ran"
    runs = services.records(f"held:{run}")
    assert [math.floor(r["at"] / hold) for r in runs] == [period_start / hold, period_start / hold + 1]


# -- slots (no processes) ------------------------------------------------------------------


def at(*args: int, micro: int = 0) -> datetime:
    return datetime(*args, microsecond=micro, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture
def app() -> Celery:
    return Celery("slots", set_as_current=False)


def test_interval_slots_are_aligned_to_the_epoch(app: Celery) -> None:
    every7 = schedule(timedelta(seconds=7), app=app)
    now = at(2026, 5, 9, 7, 35, 25, micro=123456)
    slot_start = datetime.fromtimestamp(math.floor(now.timestamp() / 7) * 7, UTC)
    # Beats started at different times (different last_run_at) agree.
    for started in (now - timedelta(seconds=s) for s in (8, 9.5, 30, 3600)):
        assert locate(every7, now, started) == (slot_start, slot_start + timedelta(seconds=7))
    # Handled already (last_run_at in the current slot): not due until the next.
    assert locate(every7, now, slot_start) == (None, slot_start + timedelta(seconds=7))
    assert locate(every7, now, now - timedelta(seconds=0.5)) == (None, slot_start + timedelta(seconds=7))


def test_crontab_slot_is_the_latest_instant(app: Celery) -> None:
    quarter = crontab(minute="*/15", app=app)
    now = at(2026, 5, 9, 7, 35, 25)
    due = (at(2026, 5, 9, 7, 30), at(2026, 5, 9, 7, 45))
    assert locate(quarter, now, at(2026, 5, 9, 7, 29, 59)) == due
    assert locate(quarter, now, at(2026, 5, 1, 3, 3, 3)) == due  # days of missed runs: once, the latest
    assert locate(quarter, now, at(2026, 5, 9, 7, 30)) == (None, at(2026, 5, 9, 7, 45))
    daily = crontab(minute=0, hour=4, app=app)
    assert locate(daily, now, at(2026, 3, 1)) == (at(2026, 5, 9, 4), at(2026, 5, 10, 4))
    assert locate(daily, now, at(2026, 5, 9, 4)) == (None, at(2026, 5, 10, 4))


def test_solar_slot_is_the_same_from_any_start(app: Celery) -> None:
    pytest.importorskip("ephem")
    from celery.schedules import solar

    sunrise = solar("sunrise", 48.85, 2.35, app=app)
    now = at(2026, 5, 9, 7, 35, 25)
    found = {
        locate(sunrise, now, at(2026, 5, 6) + timedelta(minutes=37 * i))[0]
        for i in range(0, 3 * 24 * 60 // 37)
        if at(2026, 5, 6) + timedelta(minutes=37 * i) < at(2026, 5, 9, 4)
    }
    assert len(found) == 1, found  # to the second, whatever the start of the search
    (due,) = found
    assert due is not None and due.microsecond == 0 and at(2026, 5, 9, 4) < due < at(2026, 5, 9, 5)
    assert locate(sunrise, now, due)[0] is None
    assert locate(sunrise, due + timedelta(seconds=2), due)[0] is None


def test_unsupported_schedule_is_refused(app: Celery) -> None:
    class Odd:
        def is_due(self, last_run_at: datetime) -> tuple[bool, float]:
            return True, 1.0

    with pytest.raises(ConfigurationError, match="cannot find the slots"):
        locate(Odd(), at(2026, 1, 1), at(2026, 1, 1))
    with pytest.raises(ConfigurationError, match="not positive"):
        locate(schedule(timedelta(0), app=app), at(2026, 1, 1), at(2026, 1, 1))


# -- in-process schedulers -------------------------------------------------------------------


class RecordingScheduler(MultiBeatScheduler):
    """Publishes nothing: records the (entry, slot) of each run it would send."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.published: list[tuple[str, str]] = []
        super().__init__(*args, **kwargs)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> None:
        self.published.append((entry.name, entry.options["headers"][SLOT_HEADER]))


def beat_app_for(lock_url: str, entries: dict[str, Any], *, offset: float = 0.0, **conf: Any) -> Celery:
    app = Celery(f"inproc{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(dlock_redis_url=lock_url, beat_schedule=entries, beat_max_loop_interval=0.05, **conf)
    app.now = lambda: datetime.fromtimestamp(time.time() + offset, UTC)  # type: ignore[method-assign]
    return app


def drive(schedulers: list[RecordingScheduler], until: float) -> None:
    """Tick every scheduler until the real clock reaches ``until``."""
    while time.time() < until:
        for scheduler in schedulers:
            while scheduler.tick() == 0:
                pass
        time.sleep(0.01)


@pytest.fixture
def schedulers(tmp_path: Path) -> Iterator[Callable[..., RecordingScheduler]]:
    made: list[RecordingScheduler] = []

    def make(app: Celery, name: str = "celerybeat-schedule") -> RecordingScheduler:
        scheduler = RecordingScheduler(app=app, schedule_filename=str(tmp_path / name))
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def test_each_beat_on_a_host_gets_its_own_file(
    schedulers: Callable[..., RecordingScheduler], lock_server: RedisServer, tmp_path: Path
) -> None:
    entries = {"tick": {"task": "t", "schedule": 1.0}}
    first = schedulers(beat_app_for(lock_server.url, entries))
    second = schedulers(beat_app_for(lock_server.url, entries))
    assert (first.instance, second.instance) == (0, 1)
    assert first.schedule_filename == str(tmp_path / "celerybeat-schedule-0")
    assert second.schedule_filename == str(tmp_path / "celerybeat-schedule-1")
    assert (tmp_path / "celerybeat-schedule-0.lock").read_text().split()[1] == str(os.getpid())
    first.close()
    third = schedulers(beat_app_for(lock_server.url, entries))
    assert third.instance == 0  # freed by close (or by the death of its process)


def test_bad_max_skew_is_refused(lock_server: RedisServer, tmp_path: Path) -> None:
    app = beat_app_for(lock_server.url, {}, dlock_beat_max_skew=-1)
    with pytest.raises(ConfigurationError, match="dlock_beat_max_skew"):
        MultiBeatScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)


def test_fail_closed_while_the_lock_service_is_down(
    schedulers: Callable[..., RecordingScheduler], lock_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No claim, no publish; retried while the slot lasts; a slot that outlasts the outage is lost."""
    period = 2
    scheduler = schedulers(beat_app_for(lock_server.url, {"tick": {"task": "t", "schedule": period}}))
    caplog.set_level(logging.INFO, logger="celery_dlock.beat")
    slot = (math.floor(time.time() / period) + 1) * period

    # Down from just before slot k to 0.8 s into it: sent late, once.
    sleep_until(time.time, slot - 0.3)
    lock_server.kill()
    drive([scheduler], slot + 0.8)
    assert scheduler.published == []
    assert f"not sending tick for {iso(slot)}: cannot claim it" in caplog.text
    lock_server.start()
    drive([scheduler], slot + 1.6)
    assert scheduler.published == [("tick", iso(slot))]

    # Down for the whole of slot k+1: not sent, said so; k+2 is sent.
    lock_server.kill()
    drive([scheduler], slot + 2 * period + 0.3)
    lock_server.start()
    drive([scheduler], slot + 2 * period + 1.2)
    assert scheduler.published == [("tick", iso(slot)), ("tick", iso(slot + 2 * period))]
    assert f"tick for {iso(slot + period)} was not sent: the lock service stayed unreachable" in caplog.text


def test_clock_skew_bound(schedulers: Callable[..., RecordingScheduler], lock_server: RedisServer) -> None:
    """Clocks ``max_skew`` apart never double a slot; well beyond the lease, they do.

    With a 0.5 s interval and ``max_skew`` 0.5 s, a claim made at the start of
    its slot lives 0.5 + 0.5 + 2 s, so a beat 4 s behind finds it gone.
    """
    skew, period = 0.5, 0.5
    far = skew + STALL_ALLOWANCE + period + 1.0

    def pair(entry: str, apart: float) -> list[RecordingScheduler]:
        entries = {entry: {"task": "t", "schedule": period}}
        return [
            schedulers(beat_app_for(lock_server.url, entries, offset=offset, dlock_beat_max_skew=skew))
            for offset in (0.0, apart)
        ]

    within, beyond = pair("within", skew), pair("beyond", far)
    started = time.time()
    drive(within + beyond, started + far + 2.5)

    def doubled(pair: list[RecordingScheduler]) -> list[str]:
        counts = Counter(slot for scheduler in pair for _, slot in scheduler.published)
        return [slot for slot, n in counts.items() if n > 1]

    assert len(within[1].published) >= 6  # the beat ahead sends; the one behind finds claims
    assert doubled(within) == []
    assert len(doubled(beyond)) >= 3, "the negative control did not double: the bound is not where we say"


def test_beats_claim_each_slot_once_on_a_redis_cluster(
    schedulers: Callable[..., RecordingScheduler], redis_cluster: Any
) -> None:
    """Three beats whose claims live on a real Redis Cluster: each slot of a 0.5 s entry is published once."""
    entries = {"tick": {"task": "t", "schedule": 0.5}}
    beats = [schedulers(beat_app_for(redis_cluster.url, entries)) for _ in range(3)]
    drive(beats, time.time() + 3.0)
    published = Counter(slot for beat in beats for _, slot in beat.published)
    assert len(published) >= 5, published
    assert set(published.values()) == {1}, f"a slot was published twice: {published}"
    space = Redlock(redis_cluster.url).keyspace  # the claims' names, hash-tagged for the Cluster
    claims = {space.key_of_lock(name) for name in redis_cluster.client().scan_iter(match=space.lock_pattern("beat:*"))}
    assert {f"beat:tick:{slot}" for slot in published} <= claims


def test_cron_starting_deadline_is_honoured(
    schedulers: Callable[..., RecordingScheduler], lock_server: RedisServer
) -> None:
    """A missed crontab run older than ``beat_cron_starting_deadline`` is skipped, a fresh one sent."""
    entries = {"cron": {"task": "t", "schedule": crontab()}}
    boundary = (math.floor(time.time() / 60) + 5) * 60  # a minute boundary; the beats' clocks go there

    def sent_at(seconds_after: float) -> list[tuple[str, str]]:
        app = beat_app_for(
            lock_server.url, entries, offset=boundary + seconds_after - time.time(), beat_cron_starting_deadline=10
        )
        app.conf.dlock_key_prefix = f"dlock:{uuid.uuid4().hex[:6]}:"
        scheduler = schedulers(app, name=f"s{seconds_after}")
        scheduler.schedule["cron"].last_run_at = datetime.fromtimestamp(boundary - 300, UTC)
        scheduler._heap = None  # look at the entry again
        drive([scheduler], time.time() + 0.3)
        assert scheduler.schedule["cron"].last_run_at.timestamp() == boundary
        return scheduler.published

    assert sent_at(30) == []  # 30 s late, past the 10 s deadline: skipped
    assert sent_at(5) == [("cron", iso(boundary))]
