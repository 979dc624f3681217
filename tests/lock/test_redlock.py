"""The lock core against real redis-server processes: 1, 3 and 5 nodes."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import select
import subprocess
import sys
import threading
import time

import pytest
import redis
from support.critical_sections import COUNTER, read_sections, run_sections
from support.redis_servers import RedisCluster, RedisServer
from support.stored import stored_owner

from celery_dlock import (
    DLockError,
    Lock,
    LockBusy,
    LockLost,
    LockUnavailable,
    Redlock,
    Watchdog,
)
from celery_dlock.lock.resp import pack
from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.polling import wait_until

PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


# -- the basics -----------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 5])
def test_acquire_release_and_reacquire(redis_nodes, size: int) -> None:
    nodes = redis_nodes(size)
    redlock = Redlock(nodes.urls)
    assert redlock.quorum == size // 2 + 1

    lock = redlock.acquire("job", ttl=5)
    for client in nodes.clients():
        assert stored_owner(client, "dlock:lock:job") == lock.owner
        assert 4000 < client.pttl("dlock:lock:job") <= 5000
    assert 4.5 < lock.remaining() <= 5
    assert not lock.lost

    with pytest.raises(LockBusy):
        redlock.acquire("job", ttl=5, blocking=False)

    assert lock.release() is True
    assert lock.release() is False, "a second release is a no-op"
    assert all(not c.exists("dlock:lock:job") for c in nodes.clients())
    assert not lock.lost and lock.released

    again = redlock.acquire("job", ttl=5, blocking=False)
    assert again.token > lock.token
    again.release()


def test_lock_context_manager_releases_on_exception(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    client = redis_node1[0].client()
    with pytest.raises(RuntimeError), redlock.lock("ctx", ttl=5) as lock:
        assert client.exists("dlock:lock:ctx")
        raise RuntimeError("boom")
    assert lock.released
    assert not client.exists("dlock:lock:ctx")


def test_lock_object_is_a_context_manager_and_unlock_alias(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    with redlock.acquire("alias", ttl=5) as lock:
        assert isinstance(lock, Lock)
    assert lock.released
    other = redlock.acquire("alias", ttl=5)
    assert other.unlock() is True


def test_busy_error_carries_attempts_and_holder(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls, retry_count=2, retry_delay=0.01, retry_jitter=0)
    holder = redlock.acquire("held", ttl=5, label="task-123")
    with pytest.raises(LockBusy) as caught:
        redlock.acquire("held", ttl=5)
    error = caught.value
    assert isinstance(error, DLockError) and not isinstance(error, LockUnavailable)
    assert error.key == "held"
    assert error.attempts == 3
    assert error.holder is not None
    assert error.holder["label"] == "task-123"
    assert error.holder["pid"] == os.getpid()
    assert error.holder["hostname"]
    assert 0 < error.retry_after <= 5
    assert "task-123" in str(error)
    holder.release()


def test_holder_reads_metadata_and_token(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    assert redlock.holder("nobody") is None
    with redlock.lock("meta", ttl=5, label="lbl") as lock:
        info = redlock.holder("meta")
        assert info is not None
        assert info["token"] == lock.token
        assert info["label"] == "lbl"
        assert info["acquired_at"] == pytest.approx(time.time(), abs=5)


def test_a_lock_stored_as_a_hash_by_an_older_release_is_refused_not_taken(redis_node1: RedisCluster) -> None:
    """Earlier code stored a lock as a hash: a mixed fleet fails closed on WRONGTYPE and never shares a key."""
    (client,) = redis_node1.clients()
    client.hset("dlock:lock:old", mapping={"owner": "old-release", "token": 1, "meta": "{}"})
    with pytest.raises(LockUnavailable, match="WRONGTYPE"):
        Redlock(redis_node1.urls, retry_count=0).acquire("old", ttl=5, blocking=False)
    assert client.hgetall("dlock:lock:old") == {b"owner": b"old-release", b"token": b"1", b"meta": b"{}"}


def test_acquire_is_idempotent_for_its_own_owner(redis_nodes3: RedisCluster) -> None:
    """An attempt re-sent after an ambiguous timeout finds the lock already ours."""
    redlock = Redlock(redis_nodes3.urls)
    first = redlock.attempt("idem", "owner-1", 5.0, "{}", 1)
    second = redlock.attempt("idem", "owner-1", 5.0, "{}", 2)
    assert isinstance(first, tuple) and isinstance(second, tuple)
    assert first[0] == second[0], "same owner, same token: no second grant"
    third = redlock.attempt("idem", "owner-2", 5.0, "{}", 1)
    assert isinstance(third, LockBusy)


# -- mutual exclusion -------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3])
def test_mutual_exclusion_across_threads(redis_nodes, redis_server: RedisServer, size: int) -> None:
    nodes = redis_nodes(size)
    threads = [
        threading.Thread(target=run_sections, args=(nodes.urls, redis_server.url, "shared", 15)) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder = redis_server.client()
    sections = read_sections(recorder)
    assert len(sections) == 90
    assert overlaps(sections) == []
    assert int(recorder.get(COUNTER)) == 90, "a lost update means two holders at once"
    assert falling_tokens(sections) == []


def test_mutual_exclusion_across_processes(redis_nodes3: RedisCluster, redis_server: RedisServer) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        done = pool.starmap(run_sections, [(redis_nodes3.urls, redis_server.url, "shared", 20)] * 4)
    assert done == [20, 20, 20, 20]
    recorder = redis_server.client()
    sections = read_sections(recorder)
    assert len(sections) == 80
    assert len({s.token for s in sections}) == 80
    assert overlaps(sections) == []
    assert int(recorder.get(COUNTER)) == 80
    assert falling_tokens(sections) == []


def test_lock_survives_fork(redis_node1: RedisCluster) -> None:
    """A Redlock made before a fork works in the child on its own connections."""
    redlock = Redlock(redis_node1.urls)
    redlock.acquire("before-fork", ttl=5).release()  # parent's connection is open
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_acquire_token, args=(redlock, "in-child", results))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    assert results.get(timeout=1) > 0
    assert redlock.acquire("after-fork", ttl=5).release() is True


def _acquire_token(redlock: Redlock, key: str, results) -> None:
    with redlock.lock(key, ttl=5) as lock:
        results.put(lock.token)


# -- ownership --------------------------------------------------------------------


def test_release_by_non_owner_changes_nothing(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls)
    stale = redlock.acquire("owned", ttl=0.2)
    assert wait_until(lambda: all(not c.exists("dlock:lock:owned") for c in redis_nodes3.clients()))
    current = redlock.acquire("owned", ttl=5)

    assert stale.lost
    assert stale.release() is False
    for client in redis_nodes3.clients():
        assert stored_owner(client, "dlock:lock:owned") == current.owner
    with pytest.raises(LockBusy):
        redlock.acquire("owned", ttl=5, blocking=False)
    assert current.release() is True


def test_extend_renews_the_lease(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls)
    lock = redlock.acquire("ext", ttl=1)
    lock.extend(10)
    assert lock.remaining() > 9
    assert all(c.pttl("dlock:lock:ext") > 9000 for c in redis_nodes3.clients())
    assert lock.extensions == 1
    lock.release()


def test_extend_after_expiry_fails_and_sets_lost(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls)
    lock = redlock.acquire("lapsed", ttl=0.1)
    assert wait_until(lambda: all(not c.exists("dlock:lock:lapsed") for c in redis_nodes3.clients()))
    with pytest.raises(LockLost):
        lock.extend(5)
    assert lock.lost
    assert not any(c.exists("dlock:lock:lapsed") for c in redis_nodes3.clients()), "no revival"


def test_extend_of_a_taken_lock_fails_without_touching_the_new_owner(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    lock = redlock.acquire("taken", ttl=5)
    client = redis_node1[0].client()
    client.delete("dlock:lock:taken")  # an operator's forced release
    thief = redlock.acquire("taken", ttl=5)
    with pytest.raises(LockLost):
        lock.extend(30)
    assert lock.lost
    assert client.pttl("dlock:lock:taken") <= 5000
    assert stored_owner(client, "dlock:lock:taken") == thief.owner


# -- node failures -------------------------------------------------------------------


@pytest.mark.parametrize(("size", "lost"), [(3, 1), (5, 2)])
def test_losing_a_minority_still_acquires(redis_nodes, size: int, lost: int) -> None:
    nodes = redis_nodes(size)
    redlock = Redlock(nodes.urls)
    for server in nodes.servers[:lost]:
        server.kill()
    with redlock.lock("minority", ttl=5) as lock:
        assert not lock.lost
        for server in nodes.servers[lost:]:
            assert server.client().exists("dlock:lock:minority")


@pytest.mark.parametrize(("size", "lost"), [(3, 2), (5, 3)])
def test_losing_a_majority_is_unavailable_not_busy(redis_nodes, size: int, lost: int) -> None:
    nodes = redis_nodes(size)
    redlock = Redlock(nodes.urls, retry_count=3, retry_delay=0.05, retry_jitter=0.01)
    for server in nodes.servers[:lost]:
        server.kill()
    started = time.monotonic()
    with pytest.raises(LockUnavailable) as caught:
        redlock.acquire("majority", ttl=5)
    elapsed = time.monotonic() - started
    assert not isinstance(caught.value, LockBusy)
    assert caught.value.attempts == 4
    assert len(caught.value.errors) == lost
    # Stated bound: attempts x (socket_timeout + retry_delay + retry_jitter).
    assert elapsed < 4 * (redlock.socket_timeout + 0.05 + 0.01) + 1.0
    for server in nodes.servers[lost:]:
        assert not server.client().exists("dlock:lock:majority"), "the minority is cleaned up"


def test_hung_majority_is_unavailable_within_the_socket_timeout(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls, socket_timeout=0.3)
    redlock.acquire("warm", ttl=1).release()  # connections open before the hang
    redis_nodes3[0].pause()
    redis_nodes3[1].pause()
    try:
        started = time.monotonic()
        with pytest.raises(LockUnavailable):
            redlock.acquire("hung", ttl=5, blocking=False)
        assert time.monotonic() - started < 2.0, "a hung node must not hang the caller"
    finally:
        redis_nodes3[0].resume()
        redis_nodes3[1].resume()


def test_a_hung_minority_does_not_delay_the_quorum(redis_nodes3: RedisCluster) -> None:
    """With a 5 s socket timeout, waiting on the hung node would take 5 s."""
    redlock = Redlock(redis_nodes3.urls, socket_timeout=5)
    redlock.acquire("warm", ttl=1).release()
    redis_nodes3[2].pause()
    try:
        started = time.monotonic()
        for _ in range(5):
            redlock.acquire("quorum", ttl=5).release()
        assert time.monotonic() - started < 2.5
    finally:
        redis_nodes3[2].resume()
    # After the node comes back, its backlog is drained and it serves again.
    assert wait_until(lambda: _acquires_on_all(redlock, redis_nodes3), timeout=5)


def _acquires_on_all(redlock: Redlock, nodes: RedisCluster) -> bool:
    with redlock.lock("back", ttl=5):
        return all(c.exists("dlock:lock:back") for c in nodes.clients())


def test_reacquires_after_a_node_restarts(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls)
    redlock.acquire("restart", ttl=5).release()
    for server in redis_nodes3:
        server.restart()
    with redlock.lock("restart", ttl=5, timeout=5) as lock:
        # Granted by a quorum; the last node may still be reconnecting, as a
        # slow node would be, when the acquire returns.
        assert sum(1 for c in redis_nodes3.clients() if c.exists("dlock:lock:restart")) >= redlock.quorum
    assert lock.released
    assert wait_until(lambda: not any(c.exists("dlock:lock:restart") for c in redis_nodes3.clients()))


def test_unreachable_node_is_not_bad_input() -> None:
    redlock = Redlock(["redis://127.0.0.1:1/0"], retry_count=0)
    with pytest.raises(LockUnavailable) as caught:
        redlock.acquire("x", ttl=1)
    assert caught.value.errors[0][0] == "redis://127.0.0.1:1/0"


# -- fencing tokens ------------------------------------------------------------------


def test_tokens_increase_on_one_node_across_keys_and_holders(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    tokens = []
    for key in ["a", "b", "a", "a", "c", "b"]:
        with redlock.lock(key, ttl=5, auto_extend=False) as lock:
            tokens.append(lock.token)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_tokens_increase_when_successive_quorums_differ(redis_nodes) -> None:
    """Per-node counters alone would hand out the same token twice here."""
    nodes = redis_nodes(5, PERSISTENT)
    a, b, c, d, e = nodes.servers
    redlock = Redlock(nodes.urls, retry_count=0)
    tokens = []

    d.kill()
    e.kill()
    for _ in range(5):  # quorum {a, b, c}: their counters reach 5
        with redlock.lock("fenced", ttl=5, auto_extend=False) as lock:
            tokens.append(lock.token)

    d.restart()
    e.restart()
    a.kill()
    b.kill()
    with redlock.lock("fenced", ttl=5, auto_extend=False) as lock:  # quorum {c, d, e}
        tokens.append(lock.token)

    a.restart()
    b.restart()
    c.kill()
    with redlock.lock("fenced", ttl=5, auto_extend=False) as lock:  # quorum {a, b, d, e}
        tokens.append(lock.token)

    assert all(earlier < later for earlier, later in itertools.pairwise(tokens)), tokens


# -- auto-extension ------------------------------------------------------------------


def test_watchdog_keeps_a_lock_far_past_its_ttl_then_stops(redis_nodes3: RedisCluster) -> None:
    watchdog = Watchdog()
    redlock = Redlock(redis_nodes3.urls, watchdog=watchdog)
    other = Redlock(redis_nodes3.urls)
    lock = redlock.acquire("long", ttl=0.3, auto_extend=True)
    assert len(watchdog) == 1

    assert wait_until(lambda: lock.extensions >= 6, timeout=10)  # over 2x the ttl of renewals
    with pytest.raises(LockBusy):
        other.acquire("long", ttl=1, blocking=False)
    assert not lock.lost

    lock.release()
    renewals = lock.extensions
    assert wait_until(lambda: len(watchdog) == 0)
    time.sleep(0.5)  # more than one renewal period: none must happen
    assert lock.extensions == renewals
    assert not any(c.exists("dlock:lock:long") for c in redis_nodes3.clients())


def test_watchdog_reports_a_lost_lock(redis_node1: RedisCluster) -> None:
    lost = threading.Event()
    reported: list[DLockError] = []

    def on_lost(lock: Lock, error: DLockError) -> None:
        reported.append(error)
        lost.set()

    redlock = Redlock(redis_node1.urls, watchdog=Watchdog())
    lock = redlock.acquire("stolen", ttl=0.3, auto_extend=True, on_lost=on_lost)
    redis_node1[0].client().delete("dlock:lock:stolen")
    assert lost.wait(5)
    assert isinstance(reported[0], LockLost)
    assert lock.lost


def test_watchdog_survives_a_raising_callback_and_keeps_serving(redis_node1: RedisCluster) -> None:
    watchdog = Watchdog()
    redlock = Redlock(redis_node1.urls, watchdog=watchdog)

    def explode(lock: Lock, error: DLockError) -> None:
        raise RuntimeError("callback bug")

    doomed = redlock.acquire("doomed", ttl=0.2, auto_extend=True, on_lost=explode)
    redis_node1[0].client().delete("dlock:lock:doomed")
    assert wait_until(lambda: doomed.lost)
    survivor = redlock.acquire("survivor", ttl=0.2, auto_extend=True)
    assert wait_until(lambda: survivor.extensions >= 3)
    assert not survivor.lost
    survivor.release()


def test_watchdog_stops_at_max_hold(redis_node1: RedisCluster) -> None:
    errors: list[DLockError] = []
    redlock = Redlock(redis_node1.urls, watchdog=Watchdog())
    lock = redlock.acquire(
        "capped",
        ttl=0.2,
        auto_extend=True,
        max_hold=0.5,
        on_lost=lambda lock, error: errors.append(error),
    )
    assert wait_until(lambda: bool(errors), timeout=5)  # lost turns true a moment before the callback
    assert lock.lost
    assert isinstance(errors[0], LockLost) and "max_hold" in str(errors[0])
    assert wait_until(lambda: not redis_node1[0].client().exists("dlock:lock:capped"))


def test_watchdog_retries_through_an_outage_shorter_than_the_lease(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls, watchdog=Watchdog(), socket_timeout=0.1)
    lock = redlock.acquire("outage", ttl=3, auto_extend=True)
    redis_nodes3[0].pause()
    redis_nodes3[1].pause()
    time.sleep(1.2)  # renewals at 1 s fail while the majority hangs
    redis_nodes3[0].resume()
    redis_nodes3[1].resume()
    renewals = lock.extensions
    assert wait_until(lambda: lock.extensions > renewals, timeout=5)
    assert not lock.lost
    lock.release()


# -- waiting ---------------------------------------------------------------------------


def test_blocked_waiter_is_woken_by_the_release(redis_nodes3: RedisCluster) -> None:
    """Polling every 30 s would miss the 10 s bound; the release wakes the waiter."""
    redlock = Redlock(redis_nodes3.urls, retry_delay=30, retry_jitter=0)
    holder = redlock.acquire("wake", ttl=60)
    got: list[Lock] = []
    waiting = threading.Thread(target=lambda: got.append(redlock.acquire("wake", ttl=5, timeout=60)))
    waiting.start()
    assert wait_until(lambda: _subscribers(redis_nodes3, "dlock:released:wake") == 3), "it listens on every node"
    released_at = time.monotonic()
    holder.release()
    waiting.join(10)
    assert got, "the waiter was not woken"
    assert got[0].acquired_at - released_at < 10
    got[0].release()


def _subscribers(nodes: RedisCluster, channel: str) -> int:
    return sum(dict(c.pubsub_numsub(channel)).get(channel.encode(), 0) for c in nodes.clients())


def test_waiter_takes_an_expired_lock_without_a_release(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls, retry_delay=30, retry_jitter=0)
    redlock.acquire("abandoned", ttl=0.3)  # never released
    lock = redlock.acquire("abandoned", ttl=5, timeout=10)
    assert lock.acquired_at  # woken by the holder's pttl, not the 30 s poll
    lock.release()


def test_nonblocking_acquire_makes_one_attempt(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls, retry_count=50)
    held = redlock.acquire("once", ttl=5)
    with pytest.raises(LockBusy) as caught:
        redlock.acquire("once", ttl=5, blocking=False)
    assert caught.value.attempts == 1
    held.release()


def test_timeout_bounds_the_wait(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls, retry_delay=0.05)
    held = redlock.acquire("bounded", ttl=30)
    with pytest.raises(LockBusy) as caught:
        redlock.acquire("bounded", ttl=5, timeout=0.5)
    assert caught.value.attempts > 1
    held.release()


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "error", "fragment"),
    [
        ("", ValueError, "key"),
        (None, TypeError, "key"),
        (b"bytes", TypeError, "key"),
        (42, TypeError, "key"),
        ("bad\udcff", ValueError, "key"),
    ],
)
def test_bad_key(redis_node1: RedisCluster, key, error, fragment) -> None:
    redlock = Redlock(redis_node1.urls)
    with pytest.raises(error, match=fragment):
        redlock.acquire(key, ttl=1)


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("5", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_ttl(redis_node1: RedisCluster, ttl, error) -> None:
    redlock = Redlock(redis_node1.urls)
    with pytest.raises(error, match="ttl"):
        redlock.acquire("k", ttl=ttl)
    with pytest.raises(error, match="ttl"), redlock.lock("k", ttl=ttl):
        pass


@pytest.mark.parametrize(
    ("nodes", "error", "fragment"),
    [
        ([], ValueError, "at least one"),
        (["redis://127.0.0.1:6390/0", "redis://localhost:6390/1"], ValueError, "twice"),
        (["redis://127.0.0.1:notaport/0"], ValueError, "malformed"),
        (["http://127.0.0.1:6379/0"], ValueError, "malformed"),
        (["redis://"], ValueError, "malformed"),
        ([6379], TypeError, "nodes"),
        (6379, TypeError, "nodes"),
    ],
)
def test_bad_nodes(nodes, error, fragment) -> None:
    with pytest.raises(error, match=fragment) as caught:
        Redlock(nodes)
    assert "nodes" in str(caught.value)


def test_malformed_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        Redlock(["redis://:hunter2@127.0.0.1:bad/0"])
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("retry_count", -1, ValueError),
        ("retry_count", 1.5, TypeError),
        ("retry_delay", -0.1, ValueError),
        ("drift_factor", 1.5, ValueError),
        ("socket_timeout", 0, ValueError),
        ("key_prefix", 3, TypeError),
    ],
)
def test_bad_options_name_the_parameter(option: str, value, error) -> None:
    with pytest.raises(error, match=option):
        Redlock(["redis://127.0.0.1:6390/0"], **{option: value})


def test_accepts_a_redis_client_and_ignores_its_retry_settings(redis_node1: RedisCluster) -> None:
    client = redis.Redis.from_url(redis_node1.urls[0], decode_responses=True)
    redlock = Redlock(client)
    with redlock.lock("client", ttl=5) as lock:
        assert stored_owner(client, "dlock:lock:client") == lock.owner


# -- dependencies point one way ------------------------------------------------------------


def test_core_imports_without_celery() -> None:
    code = (
        "import sys; sys.modules['celery'] = None; sys.modules['kombu'] = None\n"
        "import celery_dlock\n"
        "from celery_dlock import Redlock, Lock, LockBusy, LockUnavailable\n"
        "import celery_dlock.lock.redlock, celery_dlock.lock.watchdog, celery_dlock.lock.nodes\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_force_release_clears_a_stuck_lock_and_wakes_waiters(redis_nodes3: RedisCluster) -> None:
    """20 times over: a waiter listening on all three nodes is woken by the force release, not its 30 s retry."""
    redlock = Redlock(redis_nodes3.urls, retry_delay=30, retry_jitter=0)
    for round_ in range(20):
        stuck = redlock.acquire("stuck", ttl=60, label="crashed-task")
        got: list[Lock] = []
        waiter = threading.Thread(target=lambda: got.append(redlock.acquire("stuck", ttl=5, timeout=60)))
        waiter.start()
        assert wait_until(lambda: _subscribers(redis_nodes3, "dlock:released:stuck") == 3), "it listens on every node"
        holder = redlock.force_release("stuck")
        assert holder is not None and holder["label"] == "crashed-task"
        waiter.join(5)  # far below the retry delay: only the release can have woken it
        assert got and got[0].token > stuck.token, f"round {round_}: the waiter slept through the release"
        assert stuck.release() is False, "the old holder's release must not touch the new lock"
        assert got[0].release() is True
    assert redlock.force_release("stuck") is None


def test_counts_added_later_from_many_threads_all_reach_the_nodes(redis_nodes3: RedisCluster) -> None:
    """The metrics' lock-free ``add_later`` against flushes running meanwhile: every count is written once."""
    redlock = Redlock(redis_nodes3.urls, flush_every=0.01)
    threads, each = 8, 2000
    start = threading.Barrier(threads + 1)

    def observe() -> None:
        start.wait()
        for i in range(each):
            redlock.tally.add_later("probe", (("observed", 1), ("sum", i)))

    workers = [threading.Thread(target=observe) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    while any(worker.is_alive() for worker in workers):
        redlock.flush_counts()  # flushes race the appends, as the watchdog's timer does
        # Read each node's replies, so the flushes never run more than 32
        # unread replies ahead of a node: past that a connection is dropped
        # with commands in flight (a limit this test is not about).
        for node in redlock.nodes:
            node.execute(pack("PING"))
    for worker in workers:
        worker.join()
    expected = {"observed": threads * each, "sum": threads * sum(range(each))}
    assert redlock.stats()["probe"] == expected
    # Every node got each count once (stats() reads the first that answers).
    for client in redis_nodes3.clients():
        fields = {key.decode(): int(value) for key, value in client.hgetall(redlock.keyspace.stats).items()}
        assert {event: fields[redlock.keyspace.stats_field("probe", event)] for event in expected} == expected
    redlock.close()


def test_two_commands_to_one_node_before_any_reply_keep_replies_in_step(redis_node1: RedisCluster) -> None:
    """The second send makes the first reply stale, even when that reply is already in (a history flush).

    The first reply is left to arrive before the second send, as it does on a
    fast server: it must be skipped, not taken for a server that closed the
    connection, and the next command must get its own reply.
    """
    node = Redlock(redis_node1.urls).nodes[0]
    first_id = node.execute(pack("CLIENT", "ID"))
    node.send(pack("SET", "a", "1"))
    select.select([node.fileno()], [], [], 5)  # the reply to the first is in
    node.send(pack("SET", "b", "2"))
    node.abandon()
    node.abandon()
    assert node.execute(pack("GET", "a")) == b"1"
    assert node.execute(pack("GET", "b")) == b"2"
    assert node.execute(pack("CLIENT", "ID")) == first_id, "the connection was kept"
