"""Semaphores (``limit=N``) against real redis-server processes: 1, 3 and 5 nodes."""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import time
from collections.abc import Sequence

import pytest
import redis
from support.critical_sections import read_sections, record_section
from support.redis_servers import RedisCluster, RedisServer
from support.stored import stored_owner

from celery_dlock import LockBusy, LockUnavailable, Redlock
from celery_dlock.lock.quorum import quorum_size
from celery_dlock.lock.script import Granted
from celery_dlock.lock.scripts import parse_acquire
from celery_dlock.lock.tokens import token_floor
from celery_dlock.testing.intervals import most_at_once

LIMIT = 3


def permit_keys(client: redis.Redis, key: str) -> tuple[int, int]:
    """How many permits and holder entries one node keeps for ``key``."""
    return client.zcard(f"dlock:permits:{key}"), client.hlen(f"dlock:holders:{key}")


# -- the quorum rule -------------------------------------------------------------------


def limit_can_be_broken(nodes: int, limit: int, quorum: int) -> bool:
    """Whether ``limit + 1`` holders can each win ``quorum`` nodes with no node granting past ``limit``."""
    per_node = [0] * nodes

    def place(holder: int) -> bool:
        if holder == limit + 1:
            return True
        for chosen in itertools.combinations(range(nodes), quorum):
            if all(per_node[i] < limit for i in chosen):
                for i in chosen:
                    per_node[i] += 1
                if place(holder + 1):
                    return True
                for i in chosen:
                    per_node[i] -= 1
        return False

    return place(0)


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5])
def test_the_quorum_for_a_limit_is_the_least_that_keeps_it(nodes: int, limit: int) -> None:
    """``⌊N·L/(L+1)⌋ + 1`` nodes keep the limit; one fewer lets ``L + 1`` holders in, by exhaustive search."""
    size = quorum_size(nodes, limit)
    assert not limit_can_be_broken(nodes, limit, size)
    if size > 1:
        assert limit_can_be_broken(nodes, limit, size - 1)
    if limit == 1:
        assert size == nodes // 2 + 1


def test_a_majority_quorum_lets_three_holders_into_a_limit_of_two(redis_nodes3: RedisCluster) -> None:
    """The interleaving of ``docs/guarantees.md``, built by hand on three real nodes.

    Holder A wins nodes 0 and 1, B wins 1 and 2, C wins 0 and 2: every node
    grants only two permits, within its limit, yet each holder has a
    majority.  The rule's quorum of 3 grants none of them.
    """
    redlock = Redlock(redis_nodes3.urls)
    scheme = redlock.scheme(2)
    plan = {"A": (0, 1), "B": (1, 2), "C": (0, 2)}
    won = {}
    for owner, chosen in plan.items():
        command = scheme.acquire("api", owner=owner, lease_ms=10_000, meta="", floor=token_floor())
        replies = [parse_acquire(redlock.nodes[i].execute(command)) for i in chosen]
        won[owner] = sum(isinstance(reply, Granted) for reply in replies)
    assert [permit_keys(client, "api")[0] for client in redis_nodes3.clients()] == [2, 2, 2]
    assert sum(count >= quorum_size(3, 1) for count in won.values()) == 3, "a majority admits all three"
    assert scheme.size == 3
    assert sum(count >= scheme.size for count in won.values()) == 0
    with pytest.raises(LockBusy):
        redlock.acquire("api", ttl=10, limit=2, blocking=False)


def test_a_limit_above_one_on_three_nodes_needs_every_node(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls, socket_timeout=0.2)
    redis_nodes3[2].kill()
    assert redlock.acquire("plain", ttl=5).release() is True, "a lock needs only a majority"
    with pytest.raises(LockUnavailable):
        redlock.acquire("api", ttl=5, limit=2, blocking=False)


# -- permits ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 5])
def test_up_to_limit_permits_each_with_its_own_owner_and_token(redis_nodes, size: int) -> None:
    nodes = redis_nodes(size)
    redlock = Redlock(nodes.urls)
    permits = [redlock.acquire("api", ttl=5, limit=LIMIT, blocking=False, label=f"p{i}") for i in range(LIMIT)]
    assert len({p.owner for p in permits}) == LIMIT
    assert [p.token for p in permits] == sorted({p.token for p in permits})
    assert all(p.limit == LIMIT and not p.lost for p in permits)
    assert all(permit_keys(client, "api") == (LIMIT, LIMIT) for client in nodes.clients())
    assert [h["label"] for h in redlock.permit_holders("api")] == ["p0", "p1", "p2"]

    with pytest.raises(LockBusy, match=r"all 3 permits of 'api' are held, the first by label=p[012]") as busy:
        redlock.acquire("api", ttl=5, limit=LIMIT, blocking=False)
    assert busy.value.retry_after is not None and 0 < busy.value.retry_after <= 5

    assert permits[1].release() is True
    fourth = redlock.acquire("api", ttl=5, limit=LIMIT, blocking=False)
    assert fourth.token > permits[2].token
    for permit in (permits[0], permits[2], fourth):
        assert permit.release() is True
    assert all(not client.keys("dlock:permits:*") and not client.keys("dlock:holders:*") for client in nodes.clients())


def test_limit_one_is_the_plain_lock(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    client = redis_node1[0].client()
    with redlock.lock("job", ttl=5, limit=1) as lock:
        assert stored_owner(client, "dlock:lock:job") == lock.owner
        assert not client.exists("dlock:permits:job")
        with pytest.raises(LockBusy, match="lock 'job' is held"):
            redlock.acquire("job", ttl=5, blocking=False)


def test_a_plain_lock_on_the_key_blocks_its_permits(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    with redlock.lock("mixed", ttl=5, label="plain"), pytest.raises(LockBusy, match="label=plain"):
        redlock.acquire("mixed", ttl=5, limit=2, blocking=False)


def test_expired_permits_are_trimmed_and_leave_no_key(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    client = redis_node1[0].client()
    short = redlock.acquire("api", ttl=0.3, limit=2, blocking=False)
    long = redlock.acquire("api", ttl=5, limit=2, blocking=False)
    # Blocking: retried until the short permit's lease ends on the node.
    third = redlock.acquire("api", ttl=5, limit=2, timeout=5)
    assert permit_keys(client, "api") == (2, 2), "the expired permit and its entry are gone"
    assert client.hget("dlock:holders:api", short.owner) is None
    assert short.release() is False, "nothing left to release: the node had dropped it"
    assert long.release() is True and third.release() is True
    assert not client.exists("dlock:permits:api", "dlock:holders:api")
    held = redlock.acquire("api", ttl=0.2, limit=2, blocking=False)
    assert 0 < client.pttl("dlock:permits:api") <= 200 and 0 < client.pttl("dlock:holders:api") <= 200
    del held


def test_auto_extended_permits_outlive_their_ttl_and_a_watchdog_renews_each(redis_nodes3: RedisCluster) -> None:
    redlock = Redlock(redis_nodes3.urls)
    permits = [redlock.acquire("api", ttl=0.3, limit=2, auto_extend=True) for _ in range(2)]
    deadline = time.monotonic() + 10
    while min(p.extensions for p in permits) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.extensions >= 4 and not p.lost for p in permits)
    with pytest.raises(LockBusy):
        redlock.acquire("api", ttl=1, limit=2, blocking=False)
    assert all(p.release() for p in permits)


def test_a_node_that_lost_its_permits_is_repaired_by_the_renewal(redis_nodes5: RedisCluster) -> None:
    redlock = Redlock(redis_nodes5.urls)
    assert redlock.quorum_for(2) == 4
    client = redis_nodes5[0].client()
    permit = redlock.acquire("api", ttl=5, limit=2)
    client.delete("dlock:permits:api", "dlock:holders:api")
    permit.extend()  # four nodes still hold it: node 0 gets it back
    assert permit_keys(client, "api") == (1, 1)
    assert client.hget("dlock:holders:api", permit.owner).startswith(f"{permit.token}|".encode())
    permit.release()


def test_release_owner_frees_the_permits_of_a_dead_holder(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    redlock.acquire("api", ttl=30, limit=2, owner_prefix="worker-1:")
    other = redlock.acquire("api", ttl=30, limit=2, owner_prefix="worker-2:")
    assert redlock.release_owner("api", "worker-1:", limit=2) is True
    assert [h["token"] for h in redlock.permit_holders("api")] == [other.token]


def test_force_release_clears_every_permit(redis_node1: RedisCluster) -> None:
    redlock = Redlock(redis_node1.urls)
    for _ in range(2):
        redlock.acquire("api", ttl=30, limit=2)
    assert redlock.force_release("api") is None  # no plain holder to report
    assert redlock.permit_holders("api") == []
    redlock.acquire("api", ttl=30, limit=2, blocking=False).release()


# -- contention --------------------------------------------------------------------------


def hold_permits(urls: Sequence[str], recorder_url: str, rounds: int, hold: float = 0.02) -> list[int]:
    """Take one of :data:`LIMIT` permits ``rounds`` times, recording each section; returns the tokens."""
    redlock = Redlock(list(urls), retry_count=1000, retry_delay=0.01, retry_jitter=0.01)
    recorder = redis.Redis.from_url(recorder_url)
    tokens = []
    for _ in range(rounds):
        with redlock.lock("api", ttl=10, limit=LIMIT) as permit:
            enter = time.monotonic_ns()
            time.sleep(hold)
            record_section(recorder, "api", permit.token, enter, time.monotonic_ns())
        tokens.append(permit.token)
    return tokens


def assert_at_most_limit(recorder: redis.Redis, tokens: Sequence[Sequence[int]], expected: int) -> None:
    """Every section recorded, never more than :data:`LIMIT` at once, each holder's tokens rising."""
    sections = read_sections(recorder)
    assert len(sections) == expected == sum(len(mine) for mine in tokens)
    most = most_at_once(sections)["api"]
    assert 2 <= most <= LIMIT, f"{most} holders at once"
    assert all(list(mine) == sorted(set(mine)) for mine in tokens), "a holder's later permit had a lower token"


@pytest.mark.parametrize("size", [1, 3, 5])
def test_threads_never_hold_more_than_the_limit(redis_nodes, redis_server: RedisServer, size: int) -> None:
    nodes = redis_nodes(size)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        tokens = list(pool.map(lambda _: hold_permits(nodes.urls, redis_server.url, 8), range(6)))
    assert_at_most_limit(redis_server.client(), tokens, 6 * 8)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_processes_never_hold_more_than_the_limit(redis_nodes, redis_server: RedisServer, size: int) -> None:
    nodes = redis_nodes(size)
    context = multiprocessing.get_context("spawn")
    with context.Pool(5) as pool:
        tokens = pool.starmap(hold_permits, [(nodes.urls, redis_server.url, 8)] * 5)
    assert_at_most_limit(redis_server.client(), tokens, 5 * 8)
