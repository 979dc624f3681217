"""AsyncRedlock against real redis-server processes: 1, 3 and 5 nodes, with sync holders of the same keys.

Every wait here ends on an event (a reply, a release, a renewal count), bounded
by pytest's timeout; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
from support.critical_sections import read_sections, run_counted_sections
from support.redis_servers import RedisCluster, RedisServer
from support.stored import stored_owner

from celery_dlock import LockBusy, LockLost, LockUnavailable, Redlock
from celery_dlock.aio import AsyncLock, AsyncRedlock, DLockError, loop_watchdog
from celery_dlock.lock.resp import pack
from celery_dlock.testing.intervals import falling_tokens, most_at_once, overlaps

T = TypeVar("T")


def lock_key(key: str) -> str:
    return f"dlock:lock:{key}"


def held_anywhere(nodes: RedisCluster, key: str) -> list[int]:
    """The indices of the nodes that hold ``key``'s lock."""
    return [i for i, client in enumerate(nodes.clients()) if client.exists(lock_key(key))]


async def settle(redlock: AsyncRedlock) -> None:
    """Wait until every node has run every command sent to it so far: a quorum decides before the rest reply."""
    await asyncio.gather(*(node.execute(pack("PING")) for node in redlock.nodes))


def run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(work())


def uncancel() -> None:
    """Take back the current task's request to be cancelled, once the test has caught its CancelledError."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+; 3.10 keeps no count
        task.uncancel()


class CancelAt:
    """Await ``work``, cancelling the awaiting task at its ``at``-th suspension (0: never).

    Each time the coroutine hands the event loop a future to wait on is one
    await point; counting them makes the points exact, with no sleeping.
    ``suspensions`` says how many there were.
    """

    def __init__(self, work: Awaitable[T], at: int = 0) -> None:
        self._work = work
        self._at = at
        self.suspensions = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        steps = self._work.__await__()
        answer: Any = None
        error: BaseException | None = None
        while True:
            try:
                future = steps.throw(error) if error is not None else steps.send(answer)
            except StopIteration as stop:
                return stop.value
            self.suspensions += 1
            if self.suspensions == self._at:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            try:
                answer, error = (yield future), None
            except BaseException as exc:  # the cancellation, thrown in at this very point
                answer, error = None, exc


# -- the basics -----------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 5])
def test_acquire_release_and_exclusion_with_sync_holders(redis_nodes, size: int) -> None:
    nodes = redis_nodes(size)
    sync = Redlock(nodes.urls)

    async def scenario() -> None:
        redlock = AsyncRedlock(nodes.urls)
        assert redlock.quorum == size // 2 + 1
        lock = await redlock.acquire("job", ttl=5)
        assert isinstance(lock, AsyncLock)
        assert len(held_anywhere(nodes, "job")) >= redlock.quorum  # the rest may still be applying it
        assert 4.5 < lock.remaining() <= 5 and not lock.lost
        lock.ensure_held()
        with pytest.raises(LockBusy):
            sync.acquire("job", ttl=5, blocking=False)
        with pytest.raises(LockBusy):
            await redlock.acquire("job", ttl=5, blocking=False)
        await lock.extend(8)  # an extension waits for every node
        assert 7.5 < lock.remaining() <= 8
        assert held_anywhere(nodes, "job") == list(range(size))
        assert await lock.release() is True
        assert await lock.release() is False, "a second release is a no-op"
        assert lock.released and lock.remaining() == 0
        await settle(redlock)
        assert held_anywhere(nodes, "job") == []

        held = sync.acquire("job", ttl=5)
        assert held.token > lock.token
        with pytest.raises(LockBusy):
            await redlock.acquire("job", ttl=5, blocking=False)
        held.release()
        async with redlock.lock("job", ttl=5) as again:
            assert again.token > held.token
        await settle(redlock)
        assert held_anywhere(nodes, "job") == []
        await redlock.close()

    run(scenario)


def test_nodes_must_be_given_to_the_right_client(redis_node1: RedisCluster) -> None:
    url = redis_node1.urls[0]
    async_client = redis.asyncio.Redis.from_url(url)
    with pytest.raises(TypeError, match="AsyncRedlock"):
        Redlock(async_client)
    with pytest.raises(TypeError, match="AsyncRedlock"):
        Redlock([url, async_client])
    with pytest.raises(TypeError, match=r"redis\.asyncio"):
        AsyncRedlock(redis.Redis.from_url(url))
    with pytest.raises(ValueError, match="Sentinel"):
        AsyncRedlock("sentinel://127.0.0.1:26379")
    with pytest.raises(ValueError, match="given twice"):
        AsyncRedlock([url, url])

    async def scenario() -> None:
        redlock = AsyncRedlock(async_client)  # its settings are reused; its pool is not
        async with redlock.lock("client", ttl=5) as lock:
            assert held_anywhere(redis_node1, "client") == [0] and lock.token > 0
        await redlock.close()
        await async_client.aclose()

    run(scenario)


def test_mixed_sync_and_async_holders_in_processes_never_overlap(redis_nodes, redis_server: RedisServer) -> None:
    for size in (1, 3, 5):
        nodes = redis_nodes(size)
        key = f"shared-{size}"
        context = multiprocessing.get_context("spawn")
        clients = ["sync", "async", "sync", "async"]
        with context.Pool(len(clients)) as pool:
            done = pool.starmap(run_counted_sections, [(nodes.urls, redis_server.url, key, 15, c) for c in clients])
        assert done == [15] * len(clients)
        recorder = redis_server.client()
        sections = [s for s in read_sections(recorder) if s.key == key]
        assert len(sections) == 60 and len({s.token for s in sections}) == 60
        assert overlaps(sections) == []
        assert falling_tokens(sections) == []
        assert int(recorder.get(f"counter:{key}")) == 60, "no update was lost"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("size", "hung"), [(3, 1), (5, 2)])
def test_a_hung_minority_does_not_delay_the_quorum(redis_nodes, size: int, hung: int) -> None:
    """With a 600 s socket timeout, waiting on a hung node would outlast the test's own timeout."""
    nodes = redis_nodes(size)

    async def scenario() -> None:
        redlock = AsyncRedlock(nodes.urls, socket_timeout=600)
        await (await redlock.acquire("warm", ttl=1)).release()  # connections open before the hang
        for server in list(nodes)[:hung]:
            server.pause()
        try:
            for _ in range(5):
                lock = await redlock.acquire("quorum", ttl=5, blocking=False)
                assert await lock.release() is True
        finally:
            for server in list(nodes)[:hung]:
                server.resume()
        # Back, the hung nodes answer in order, and serve again: an extension
        # waits for every node's reply, so each has run the acquire before it.
        async with redlock.lock("back", ttl=5) as back:
            await back.extend()
            assert held_anywhere(nodes, "back") == list(range(size))
        await redlock.close()

    run(scenario)


def test_a_hung_majority_is_unavailable(redis_nodes3: RedisCluster) -> None:
    async def scenario() -> None:
        redlock = AsyncRedlock(redis_nodes3.urls, socket_timeout=0.3)
        await (await redlock.acquire("warm", ttl=1)).release()
        redis_nodes3[0].pause()
        redis_nodes3[1].pause()
        try:
            with pytest.raises(LockUnavailable):
                await redlock.acquire("hung", ttl=5, blocking=False)
        finally:
            redis_nodes3[0].resume()
            redis_nodes3[1].resume()
        await redlock.close()

    run(scenario)


# -- semaphores -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 5])
def test_permits_are_shared_with_sync_holders_of_the_same_limit(redis_nodes, size: int) -> None:
    nodes = redis_nodes(size)
    sync = Redlock(nodes.urls)

    async def scenario() -> None:
        redlock = AsyncRedlock(nodes.urls)
        assert redlock.quorum_for(2) == sync.quorum_for(2)
        first = await redlock.acquire("api", ttl=10, limit=2)
        second = sync.acquire("api", ttl=10, limit=2)
        assert first.limit == 2 and second.token != first.token
        with pytest.raises(LockBusy, match="permits"):
            await redlock.acquire("api", ttl=10, limit=2, blocking=False)
        await first.extend()
        assert await first.release() is True
        async with redlock.lock("api", ttl=10, limit=2) as third:
            assert third.token > first.token
            with pytest.raises(LockBusy):
                sync.acquire("api", ttl=10, limit=2, blocking=False)
        second.release()
        await redlock.close()

    run(scenario)


def test_mixed_permit_holders_in_processes_never_exceed_the_limit(redis_nodes3: RedisCluster, redis_server) -> None:
    context = multiprocessing.get_context("spawn")
    clients = ["sync", "async", "async", "sync", "async"]
    jobs = [(redis_nodes3.urls, redis_server.url, "pool", 10, client, 2) for client in clients]
    with context.Pool(len(clients)) as pool:
        assert pool.starmap(run_counted_sections, jobs) == [10] * len(clients)
    sections = read_sections(redis_server.client())
    assert len(sections) == 50
    # Not asserted: distinct tokens.  Two permits taken at once can be granted
    # in opposite orders by different nodes and end with the same maximum.
    assert most_at_once(sections)["pool"] <= 2


# -- waking on release -------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 3])
def test_a_waiter_is_woken_by_a_sync_holders_release(redis_nodes, size: int) -> None:
    """The retry delay is 10 minutes: only the release's message can wake the waiter in time."""
    nodes = redis_nodes(size)
    sync = Redlock(nodes.urls)
    holder = sync.acquire("wake", ttl=600)

    async def scenario() -> None:
        redlock = AsyncRedlock(nodes.urls, retry_delay=600, retry_jitter=0)
        waiter = asyncio.ensure_future(redlock.acquire("wake", ttl=5))
        probe = nodes[0].client()
        while probe.pubsub_numsub("dlock:released:wake")[0][1] == 0:  # subscribed: the waiter is listening
            await asyncio.sleep(0.01)
        await asyncio.to_thread(holder.release)
        lock = await waiter
        assert lock.token > holder.token
        await lock.release()
        await redlock.close()

    run(scenario)


# -- cancellation ---------------------------------------------------------------------


@pytest.mark.parametrize(("size", "limit"), [(1, 1), (3, 1), (3, 2)])
def test_cancelling_acquire_at_every_await_point_leaves_nothing_held(redis_nodes, size: int, limit: int) -> None:
    nodes = redis_nodes(size)

    def holding(key: str) -> list[int]:
        if limit == 1:
            return held_anywhere(nodes, key)
        return [i for i, client in enumerate(nodes.clients()) if client.zcard(f"dlock:permits:{key}")]

    async def scenario() -> int:
        redlock = AsyncRedlock(nodes.urls)
        whole = CancelAt(redlock.acquire("probe", ttl=30, limit=limit))
        await (await whole).release()
        assert whole.suspensions > 0
        cancelled = 0
        for at in range(1, whole.suspensions + 1):
            key = f"cancel-{at}"
            try:
                lock = await CancelAt(redlock.acquire(key, ttl=30, limit=limit), at)
            except asyncio.CancelledError:
                cancelled += 1
                assert holding(key) == [], f"cancelled at await {at}, the lock stayed"
                uncancel()
            else:  # this run suspended fewer times: nothing to cancel
                await lock.release()
            again = await redlock.acquire(key, ttl=30, blocking=False, limit=limit)
            await again.release()
        await redlock.close()
        return cancelled

    assert run(scenario) >= 1


def test_cancelling_a_blocked_acquire_at_every_await_point_leaves_no_listener(redis_nodes3: RedisCluster) -> None:
    sync = Redlock(redis_nodes3.urls)
    holder = sync.acquire("blocked", ttl=60)
    probe = redis_nodes3[0].client()

    async def scenario() -> None:
        redlock = AsyncRedlock(redis_nodes3.urls, retry_delay=0.01, retry_jitter=0)
        whole = CancelAt(redlock.acquire("blocked", ttl=30, timeout=0.2))
        with pytest.raises(LockBusy):
            await whole
        for at in range(1, whole.suspensions + 1):
            with pytest.raises((asyncio.CancelledError, LockBusy)):
                await CancelAt(redlock.acquire("blocked", ttl=30, timeout=0.2), at)
            uncancel()
            assert stored_owner(probe, lock_key("blocked")) == holder.owner
            assert probe.pubsub_numsub("dlock:released:blocked")[0][1] == 0
        await redlock.close()

    run(scenario)
    assert holder.release()


@pytest.mark.parametrize("size", [1, 3])
def test_cancelling_release_at_every_await_point_still_releases(redis_nodes, size: int) -> None:
    nodes = redis_nodes(size)

    async def scenario() -> None:
        redlock = AsyncRedlock(nodes.urls)
        lock = await redlock.acquire("probe", ttl=30)
        whole = CancelAt(lock.release())
        assert await whole is True
        for at in range(1, whole.suspensions + 1):
            lock = await redlock.acquire("release", ttl=30)
            with pytest.raises(asyncio.CancelledError):
                await CancelAt(lock.release(), at)
            uncancel()
            assert not lock.lost
            await lock.release()  # waits for the same release, which went on
            await settle(redlock)
            assert lock.released and held_anywhere(nodes, "release") == []
        await redlock.close()

    run(scenario)


def test_leaving_async_with_after_a_cancellation_releases(redis_nodes3: RedisCluster) -> None:
    async def scenario() -> None:
        redlock = AsyncRedlock(redis_nodes3.urls)
        entered = asyncio.Event()

        async def body() -> None:
            async with redlock.lock("body", ttl=30):
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.ensure_future(body())
        await entered.wait()
        await settle(redlock)
        assert held_anywhere(redis_nodes3, "body") == [0, 1, 2]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(redlock)
        assert held_anywhere(redis_nodes3, "body") == []
        await redlock.close()

    run(scenario)


# -- auto-extension ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_watchdog_keeps_a_short_lock_through_ten_renewals_then_stops(redis_nodes3: RedisCluster) -> None:
    sync = Redlock(redis_nodes3.urls)

    async def scenario() -> None:
        redlock = AsyncRedlock(redis_nodes3.urls)
        locks = [await redlock.acquire(f"long-{i}", ttl=0.3, auto_extend=True) for i in range(3)]
        watchdog = loop_watchdog()
        assert len(watchdog) == 3
        renewers = [t for t in asyncio.all_tasks() if t.get_name() == "celery-dlock-watchdog"]
        assert renewers == [watchdog.task], "one renewal task for the loop, not one per lock"
        while min(lock.extensions for lock in locks) < 10:  # 10 renewals: over 3 s of a 0.3 s ttl
            await asyncio.sleep(0.05)
        with pytest.raises(LockBusy):
            sync.acquire("long-0", ttl=1, blocking=False)
        assert not any(lock.lost for lock in locks)

        for lock in locks:
            assert await lock.release() is True
        assert len(watchdog) == 0
        renewer = watchdog.task
        if renewer is not None:
            await renewer  # it ends once it watches no lock
        renewals = [lock.extensions for lock in locks]
        await asyncio.sleep(0)
        assert [lock.extensions for lock in locks] == renewals
        await settle(redlock)
        assert not any(held_anywhere(redis_nodes3, f"long-{i}") for i in range(3))
        await redlock.close()

    run(scenario)


@pytest.mark.timeout(60)
def test_a_lost_lock_is_reported_through_on_lost(redis_node1: RedisCluster) -> None:
    async def scenario() -> None:
        redlock = AsyncRedlock(redis_node1.urls)
        reported: asyncio.Queue[tuple[AsyncLock, DLockError]] = asyncio.Queue()
        lock = await redlock.acquire(
            "lost", ttl=0.5, auto_extend=True, on_lost=lambda lock, error: reported.put_nowait((lock, error))
        )
        redis_node1[0].client().delete(lock_key("lost"))  # an operator's force release, say
        got, error = await reported.get()
        assert got is lock and isinstance(error, LockLost)
        assert lock.lost
        with pytest.raises(LockLost):
            lock.ensure_held()
        assert await lock.release() is False
        await redlock.close()

    run(scenario)
