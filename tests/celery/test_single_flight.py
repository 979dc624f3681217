"""Single-flight tasks on a real in-process worker (four threads) and real Redis.

Bodies record ``key token enter exit`` on the monotonic clock in a Redis list;
the tests check that no two runs on one key overlapped and count what ran,
what was requeued and what was skipped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore, Reject
from support.critical_sections import read_sections, record_section
from support.event_receiver import receiving
from support.redis_servers import RedisServer

from celery_dlock import (
    LockBusy,
    LockLost,
    LockUnavailable,
    Redlock,
    SingleFlightTask,
    TaskSkipped,
    current_lock,
    single_flight,
)
from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.polling import wait_until

FAST_REQUEUE = {"dlock_requeue_delay": 0.02, "dlock_requeue_max_delay": 0.1}


@pytest.fixture
def recorder(redis_server: RedisServer) -> redis.Redis:
    """Where bodies record what they did: a separate database of the broker's server."""
    return redis_server.client(db=5)


@contextlib.contextmanager
def section(recorder: redis.Redis, key: str) -> Iterator[None]:
    """Record one run of a body, with the lock's token, in the shared history."""
    lock = current_lock()
    enter = time.monotonic_ns()
    yield
    leave = time.monotonic_ns()
    token = lock.token if lock is not None else -1
    record_section(recorder, key, token, enter, leave)


def define(app: Celery, recorder: redis.Redis) -> SimpleNamespace:
    """Tasks of every kind, registered on ``app`` before its worker starts."""
    app.conf.update(FAST_REQUEUE)

    @app.task(shared=False, bind=True)
    @single_flight(key="acct:{account_id}", on_busy="requeue")
    def charge(self: Any, account_id: int, hold: float = 0.05) -> dict[str, Any]:
        with section(recorder, f"acct:{account_id}"):
            time.sleep(hold)
        recorder.incr("ran")
        return {"retries": self.request.retries, "requeues": (self.request.headers or {}).get("dlock_requeues", 0)}

    @app.task(shared=False)
    @single_flight(key="wait:{n}", on_busy="wait", wait_timeout=10)
    def waiter(n: int, hold: float = 0.05) -> int:
        with section(recorder, f"wait:{n}"):
            time.sleep(hold)
        return current_lock().token  # type: ignore[union-attr]

    @app.task(shared=False)
    @single_flight(key="skip:{n}", on_busy="skip")
    def skipper(n: int) -> str:
        recorder.incr("skipper-ran")
        return "ran"

    @app.task(shared=False)
    @single_flight(key="raise:{n}", on_busy="raise")
    def raiser(n: int) -> str:
        return "ran"

    @app.task(shared=False)
    @single_flight(key="capped:{n}", on_busy="requeue", max_requeues=2)
    def capped(n: int) -> str:
        recorder.incr("capped-ran")
        return "ran"

    @app.task(shared=False)
    @single_flight(key="wait-skip:{n}", on_busy="wait", wait_timeout=0.3, wait_fallback="skip")
    def wait_then_skip(n: int) -> str:
        return "ran"

    @app.task(shared=False, base=SingleFlightTask, single_flight={"key": "base:{n}", "on_busy": "wait"}, bind=True)
    def based(self: Any, n: int) -> list[Any]:
        with section(recorder, f"base:{n}"):
            time.sleep(0.05)
        return [self.dlock.key, self.dlock.token, self.request.id]

    class Sync(SingleFlightTask):
        name = "tests.sync"
        single_flight: ClassVar[dict[str, str]] = {"key": "sync:{account_id}", "on_busy": "wait"}

        def run(self, account_id: int) -> int:
            with section(recorder, f"sync:{account_id}"):
                time.sleep(0.05)
            return self.dlock.token  # type: ignore[union-attr]

    sync = app.register_task(Sync())

    @single_flight(key="above:{n}", on_busy="wait")
    @app.task(shared=False, bind=True)
    def above(self: Any, n: int) -> str:
        with section(recorder, f"above:{n}"):
            time.sleep(0.05)
        return self.request.id

    @app.task(shared=False, bind=True, max_retries=3)
    @single_flight(key="retry:{n}", on_busy="requeue")
    def retrying(self: Any, n: int) -> list[int]:
        recorder.rpush("retry-tokens", current_lock().token)  # type: ignore[union-attr]
        if self.request.retries == 0:
            raise self.retry(countdown=0.05)
        return [int(t) for t in recorder.lrange("retry-tokens", 0, -1)]

    @app.task(shared=False)
    @single_flight(key="exit:{how}")
    def leaving(how: str) -> None:
        recorder.rpush("left", how)
        recorder.rpush(f"left-token:{how}", current_lock().token)
        if how == "ignore":
            raise Ignore()
        if how == "reject":
            raise Reject("no", requeue=False)
        raise ValueError("body failed")

    @app.task(shared=False, base=SingleFlightTask, single_flight={"key": "lost:{n}", "ttl": 0.6}, bind=True)
    def losing(self: Any, n: int, lock_url: str) -> list[Any]:
        redis.Redis.from_url(lock_url).delete(f"dlock:lock:lost:{n}")  # another party breaks it
        deadline = time.monotonic() + 10
        while not self.dlock.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            self.dlock.ensure_held()
        except LockLost:
            # The hook runs in the watchdog thread just after ``lost`` is set.
            while recorder.get("lost-hook") is None and time.monotonic() < deadline:
                time.sleep(0.02)
            return ["lost", int(recorder.get("lost-hook") or 0)]
        return ["held", 0]

    def on_lock_lost(lock: Any, error: Any) -> None:
        recorder.incr("lost-hook")

    losing.on_lock_lost = on_lock_lost

    @app.task(shared=False)
    @single_flight
    def hashed(a: int, b: int = 2) -> str:
        return current_lock().key  # type: ignore[union-attr]

    @app.task(shared=False)
    def plain(x: int) -> int:
        return x * 2

    return SimpleNamespace(
        charge=charge,
        waiter=waiter,
        skipper=skipper,
        raiser=raiser,
        capped=capped,
        wait_then_skip=wait_then_skip,
        based=based,
        sync=sync,
        above=above,
        retrying=retrying,
        leaving=leaving,
        losing=losing,
        hashed=hashed,
        plain=plain,
    )


@pytest.fixture
def tasks(celery_app: Celery, recorder: redis.Redis) -> SimpleNamespace:
    """The test tasks; request it before ``celery_worker`` so the worker knows them."""
    return define(celery_app, recorder)


def hold_externally(lock_server: RedisServer, key: str, ttl: float = 30) -> Any:
    """Take ``key`` from outside any task, as another worker would."""
    return Redlock(lock_server.url).acquire(key, ttl=ttl)


# -- the three ways in --------------------------------------------------------------


def test_decorator_below_app_task_serialises_one_key(tasks, celery_worker, recorder) -> None:
    results = [tasks.charge.delay(7) for _ in range(8)] + [tasks.charge.delay(8) for _ in range(4)]
    outcomes = [r.get(timeout=30) for r in results]
    sections = read_sections(recorder)
    assert len(sections) == 12
    assert int(recorder.get("ran")) == 12
    assert overlaps(sections) == []
    assert falling_tokens(sections) == []
    requeued = sum(o["requeues"] for o in outcomes)
    assert requeued > 0, "with four threads and one key, some runs must have been requeued"
    assert all(o["retries"] == 0 for o in outcomes), "requeues must not count as retries"


def test_base_class_with_options(tasks, celery_worker, recorder) -> None:
    results = [tasks.based.delay(1) for _ in range(5)]
    outcomes = [r.get(timeout=30) for r in results]
    assert {o[0] for o in outcomes} == {"base:1"}
    assert [o[2] for o in outcomes] == [r.id for r in results]
    assert overlaps(read_sections(recorder)) == []


def test_subclass_with_class_attribute(tasks, celery_worker, recorder) -> None:
    tokens = [r.get(timeout=30) for r in [tasks.sync.delay(3) for _ in range(5)]]
    assert len(set(tokens)) == 5
    assert overlaps(read_sections(recorder)) == []


def test_decorator_above_app_task(tasks, celery_worker, recorder) -> None:
    results = [tasks.above.delay(2) for _ in range(5)]
    assert [r.get(timeout=30) for r in results] == [r.id for r in results]
    sections = read_sections(recorder)
    assert len(sections) == 5 and overlaps(sections) == []


def test_app_wide_task_cls_leaves_plain_tasks_alone(redis_server, lock_server) -> None:
    from celery.contrib.testing.worker import start_worker

    app = Celery("wide", task_cls="celery_dlock:SingleFlightTask", set_as_current=False)
    app.conf.update(broker_url=redis_server.url, result_backend=redis_server.url, dlock_redis_url=lock_server.url)

    @app.task(shared=False, name="wide.plain")
    def plain(x: int) -> int:
        return x + 1

    @app.task(shared=False, name="wide.locked", single_flight={"key": "wide:{x}"})
    def locked(x: int) -> int:
        return current_lock().token  # type: ignore[union-attr]

    assert isinstance(plain, SingleFlightTask) and plain.single_flight is None
    lock_client = lock_server.client()
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        lock_client.config_resetstat()
        assert [plain.delay(i).get(timeout=10) for i in range(20)] == list(range(1, 21))
        stats = lock_client.info("commandstats")
        touched = {name for name in stats if not name.startswith(("cmdstat_config", "cmdstat_info"))}
        assert touched == set(), f"plain tasks touched the lock server: {stats}"
        assert locked.delay(1).get(timeout=10) > 0
        assert "cmdstat_evalsha" in lock_client.info("commandstats")


# -- keys ---------------------------------------------------------------------------------


def test_hashed_key_binds_defaults_and_keywords(tasks, celery_worker) -> None:
    keys = {r.get(timeout=10) for r in [tasks.hashed.delay(1), tasks.hashed.delay(a=1), tasks.hashed.delay(1, b=2)]}
    assert len(keys) == 1
    (key,) = keys
    assert key.startswith(f"{tasks.hashed.name}:") and len(key.split(":")[-1]) == 64
    assert tasks.hashed.delay(2).get(timeout=10) != key


# -- busy policies ---------------------------------------------------------------------


def test_wait_runs_every_duplicate_in_turn(tasks, celery_worker, recorder) -> None:
    tokens = [r.get(timeout=30) for r in [tasks.waiter.delay(1) for _ in range(6)]]
    assert len(set(tokens)) == 6
    sections = read_sections(recorder)
    assert len(sections) == 6 and overlaps(sections) == []


def test_skip_drops_the_duplicate_and_get_does_not_hang(tasks, celery_worker, lock_server, recorder) -> None:
    holder = hold_externally(lock_server, "skip:1")
    result = tasks.skipper.delay(1)
    with pytest.raises(TaskSkipped) as caught:
        result.get(timeout=10)
    assert isinstance(caught.value, LockBusy)
    assert result.state == "FAILURE"
    assert recorder.get("skipper-ran") is None
    holder.release()
    assert tasks.skipper.delay(1).get(timeout=10) == "ran"


def test_raise_fails_with_lock_busy(tasks, celery_worker, lock_server) -> None:
    holder = hold_externally(lock_server, "raise:1")
    with pytest.raises(LockBusy):
        tasks.raiser.delay(1).get(timeout=10)
    holder.release()


def test_wait_falls_back_after_its_timeout(tasks, celery_worker, lock_server) -> None:
    holder = hold_externally(lock_server, "wait-skip:1")
    started = time.monotonic()
    with pytest.raises(TaskSkipped):
        tasks.wait_then_skip.delay(1).get(timeout=10)
    assert time.monotonic() - started >= 0.3
    holder.release()


def test_requeue_gives_up_at_max_requeues(tasks, celery_worker, lock_server, recorder) -> None:
    holder = hold_externally(lock_server, "capped:1")
    result = tasks.capped.delay(1)
    with pytest.raises(LockBusy, match="max_requeues=2"):
        result.get(timeout=20)
    assert recorder.get("capped-ran") is None
    holder.release()


def test_requeued_task_runs_once_the_holder_releases(tasks, celery_worker, lock_server, recorder) -> None:
    holder = hold_externally(lock_server, "acct:5")
    result = tasks.charge.delay(5)
    time.sleep(0.3)  # several requeues happen while the key is held
    assert recorder.get("ran") is None
    holder.release()
    assert result.get(timeout=20)["requeues"] >= 1
    assert int(recorder.get("ran")) == 1


# -- release on every in-body path ---------------------------------------------------------


def test_retry_releases_and_the_retried_run_takes_a_new_token(tasks, celery_worker, lock_server) -> None:
    tokens = tasks.retrying.delay(1).get(timeout=20)
    assert len(tokens) == 2 and tokens[1] > tokens[0]
    assert not lock_server.client().exists("dlock:lock:retry:1")


@pytest.mark.parametrize("how", ["ignore", "reject", "fail"])
def test_body_exits_release_the_lock(tasks, celery_worker, lock_server, recorder, how: str) -> None:
    result = tasks.leaving.delay(how)
    if how == "fail":
        with pytest.raises(ValueError):
            result.get(timeout=10)
    client = lock_server.client()
    assert wait_until(lambda: recorder.lrange("left", 0, -1) == [how.encode()])
    # The lease is 30 s: a key gone within a few seconds was released, not expired.
    assert wait_until(lambda: not client.exists(f"dlock:lock:exit:{how}"), timeout=5)
    # Taken once: the key's counter is at the one token the body held.
    assert int(client.get("dlock:fence")) == int(recorder.lindex(f"left-token:{how}", 0))
    assert recorder.llen(f"left-token:{how}") == 1


def test_lost_lock_is_reported_to_the_task(tasks, celery_worker, lock_server) -> None:
    outcome = tasks.losing.delay(1, lock_server.url).get(timeout=20)
    assert outcome == ["lost", 1]


# -- fail modes ---------------------------------------------------------------------------------


def test_fail_closed_never_runs_unlocked(celery_app, recorder) -> None:
    from celery.contrib.testing.worker import start_worker

    celery_app.conf.update(dlock_redis_url="redis://127.0.0.1:1/0", dlock_max_requeues=2, **FAST_REQUEUE)

    @celery_app.task(shared=False)
    @single_flight(key="down:{n}")
    def guarded(n: int) -> str:
        recorder.incr("down-ran")
        return "ran"

    with (
        start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False),
        pytest.raises(LockUnavailable, match="max_requeues=2"),
    ):
        guarded.delay(1).get(timeout=20)
    assert recorder.get("down-ran") is None


def test_fail_open_runs_unlocked_with_a_warning(celery_app, recorder, caplog) -> None:
    from celery.contrib.testing.worker import start_worker

    celery_app.conf.update(dlock_redis_url="redis://127.0.0.1:1/0", dlock_fail_mode="open")

    @celery_app.task(shared=False)
    @single_flight(key="open:{n}")
    def guarded(n: int) -> str:
        recorder.incr("open-ran")
        return "ran"

    task_logger = logging.getLogger("celery_dlock.celery.guard")  # the worker gives task loggers its level
    task_logger.addHandler(caplog.handler)
    try:
        with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"):
            assert guarded.delay(1).get(timeout=20) == "ran"
    finally:
        task_logger.removeHandler(caplog.handler)
    assert int(recorder.get("open-ran")) == 1
    assert any("unlocked" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# -- the worker refuses bad settings at start-up --------------------------------------------


@pytest.mark.parametrize(
    ("conf", "fragment"),
    [
        ({"dlock_on_busy": "later"}, "dlock_on_busy"),
        ({"dlock_redis_url": "http://nowhere"}, "dlock_redis_url"),
        (
            {"dlock_requeue_max_delay": 120, "broker_transport_options": {"visibility_timeout": 60}},
            "visibility_timeout",
        ),
    ],
)
def test_worker_refuses_to_start_on_a_bad_setting(celery_app, conf, fragment) -> None:
    from celery.contrib.testing.worker import start_worker

    from celery_dlock import ConfigurationError

    celery_app.conf.update(conf)

    @celery_app.task(shared=False)
    @single_flight(key="cfg:{n}")
    def guarded(n: int) -> None: ...

    with (
        pytest.raises(ConfigurationError, match=fragment),
        start_worker(celery_app, pool="threads", concurrency=1, perform_ping_check=False),
    ):
        pass


# -- hold: keep the lock after the body, so duplicates of one run run once ------------------------


def test_hold_keeps_the_lock_until_the_ttl_runs_out(celery_app, celery_worker_pool, recorder, lock_server) -> None:
    from celery.contrib.testing.worker import start_worker

    @celery_app.task(shared=False)
    @single_flight(key="held:{n}", ttl=1.5, hold=True)
    def tick(n: int) -> str:
        recorder.incr("ticks")
        return "ran"

    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False):
        assert tick.delay(1).get(timeout=10) == "ran"
        with pytest.raises(TaskSkipped):
            tick.delay(1).get(timeout=10)  # a second publish of the same run
        assert lock_server.client().exists("dlock:lock:held:1"), "kept after the body returned"
        assert wait_until(lambda: not lock_server.client().exists("dlock:lock:held:1"), timeout=5)
        assert tick.delay(1).get(timeout=10) == "ran"
    assert int(recorder.get("ticks")) == 2


def test_hold_for_a_period_runs_once_per_slot(celery_app, recorder) -> None:
    from celery.contrib.testing.worker import start_worker

    period = 2.0

    @celery_app.task(shared=False)
    @single_flight(key="slot:{n}", hold=period)
    def tick(n: int) -> str:
        recorder.incr("slot-ticks")
        return "ran"

    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False):
        time.sleep(period - time.time() % period + 0.05)  # start just after a slot begins
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(tick.delay(1).get(timeout=10))
            except TaskSkipped:
                outcomes.append("skipped")
        assert outcomes == ["ran", "skipped", "skipped"]
        time.sleep(period - time.time() % period + 0.05)  # the next slot
        assert tick.delay(1).get(timeout=10) == "ran"
    assert int(recorder.get("slot-ticks")) == 2


def test_hold_releases_when_the_body_fails(celery_app, lock_server) -> None:
    from celery.contrib.testing.worker import start_worker

    @celery_app.task(shared=False)
    @single_flight(key="held-fail", hold=True, ttl=30)
    def tick() -> None:
        raise RuntimeError("failed run")

    with (
        start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False),
        pytest.raises(RuntimeError),
    ):
        tick.delay().get(timeout=10)
    assert not lock_server.client().exists("dlock:lock:held-fail")


def test_counters_are_kept_per_task_in_redis(tasks, celery_worker, lock_server) -> None:
    holder = hold_externally(lock_server, "skip:9")
    with pytest.raises(TaskSkipped):
        tasks.skipper.delay(9).get(timeout=10)
    holder.release()
    assert tasks.skipper.delay(9).get(timeout=10) == "ran"
    expected = {"busy": 1, "skipped": 1, "acquired": 1, "released": 1}
    reader = Redlock(lock_server.url)
    # The worker writes its counts within flush_every (1 s); they must not overshoot either.
    wait_until(lambda: reader.stats().get(tasks.skipper.name) == expected, 5, message=lambda: f"{reader.stats()}")


# -- events reach a real event receiver ---------------------------------------------------------


def test_plugin_events_reach_an_event_receiver(tasks, celery_app, celery_worker, lock_server) -> None:
    with receiving(celery_app) as seen:
        holder = hold_externally(lock_server, "skip:77")
        skipped = tasks.skipper.delay(77)
        with pytest.raises(TaskSkipped):
            skipped.get(timeout=10)
        requeued = tasks.charge.delay(77)
        holder.release()
        hold = hold_externally(lock_server, "acct:77")
        requeued2 = tasks.charge.delay(77)
        assert wait_until(lambda: any(e["type"] == "task-requeued" and e["uuid"] == requeued2.id for e in seen))
        hold.release()
        requeued.get(timeout=20)
        requeued2.get(timeout=20)
        lost = tasks.losing.delay(3, lock_server.url)
        assert lost.get(timeout=20)[0] == "lost"

        def has(type_: str, uuid: str) -> bool:
            return any(e["type"] == type_ and e.get("uuid") == uuid for e in seen)

        assert wait_until(lambda: has("task-skipped", skipped.id) and has("task-lock-lost", lost.id))
        assert has("task-lock-acquired", requeued.id)
        skipped_event = next(e for e in seen if e["type"] == "task-skipped")
        assert skipped_event["key"] == "skip:77"
