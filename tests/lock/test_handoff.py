"""The handoff queue of the lock core, against a real redis-server and a real Redis Cluster.

Every test runs on both: on the Cluster the key's lock, queue, parked
payloads, queue index and fencing counter share one hash slot, and the sweep
finds queues on every master.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.redis_servers import RedisCluster
from support.stored import stored_owner

from celery_dlock import AlreadyClaimed, HandoffQueue, LockBusy, QueueFull, Redlock
from celery_dlock.testing.polling import wait_until


@pytest.fixture(params=["node", "cluster"])
def queue(request: pytest.FixtureRequest) -> HandoffQueue:
    if request.param == "cluster":
        return HandoffQueue(Redlock(request.getfixturevalue("clean_redis_cluster").url))
    return HandoffQueue(Redlock(request.getfixturevalue("redis_node1").urls))


@pytest.fixture
def client(queue: HandoffQueue) -> Any:
    """A redis-py client of the queue's node (on a Cluster, one that follows its slots)."""
    (node,) = queue.redlock.nodes
    made = node.client(5)
    yield made
    made.close()


def test_release_hands_the_key_to_parked_tickets_in_order(queue: HandoffQueue) -> None:
    holder = queue.acquire("k", ttl=5)
    assert [queue.park("k", t, t.encode(), max_queued=10) for t in ("a", "b", "c")] == ["a", "b", "c"]
    assert queue.queued("k") == ["a", "b", "c"]

    with pytest.raises(LockBusy):
        queue.acquire("k", ttl=5)  # a newcomer does not jump the queue
    holder.release()
    order = []
    handoff = holder.handoff
    while handoff is not None:
        with pytest.raises(LockBusy):
            queue.acquire("k", ttl=5)  # reserved for the handed-off ticket
        lock = queue.acquire("k", ttl=5, ticket=handoff.ticket)
        order.append(handoff.payload.decode())
        assert lock.token > holder.token
        lock.release()
        handoff = lock.handoff
    assert order == ["a", "b", "c"]
    assert queue.queued("k") == []
    assert queue.acquire("k", ttl=5).release()


def test_a_payload_delivered_twice_runs_once(queue: HandoffQueue) -> None:
    holder = queue.acquire("dup", ttl=5)
    queue.park("dup", "t1", b"x", max_queued=10)
    assert queue.park("dup", "t1", b"x", max_queued=10) == "t1"  # parking twice parks once
    holder.release()
    assert holder.handoff is not None and holder.handoff.ticket == "t1"
    first = queue.acquire("dup", ttl=5, ticket="t1")
    with pytest.raises(AlreadyClaimed):
        queue.acquire("dup", ttl=5, ticket="t1")
    first.release()
    with pytest.raises(AlreadyClaimed):
        queue.acquire("dup", ttl=5, ticket="t1")


def test_a_lost_handoff_is_handed_off_again(queue: HandoffQueue, client: Any) -> None:
    holder = queue.acquire("lost", ttl=0.3)
    queue.park("lost", "t1", b"x", max_queued=10)
    holder.release()  # reserved for t1 for 0.3 s, but nobody publishes it
    assert holder.handoff is not None
    name = queue.redlock.keyspace.lock("lost")
    assert stored_owner(client, name) == "park:t1"
    assert queue.sweep(5) == [], "the reservation still stands"
    wait_until(lambda: not client.exists(name), 5, interval=0.01, message="the reservation to run out")
    (again,) = queue.sweep(5)
    assert (again.ticket, again.payload) == ("t1", b"x")
    queue.acquire("lost", ttl=5, ticket="t1").release()
    assert queue.sweep(5) == []


def test_a_newcomer_hands_off_stranded_tickets_first(queue: HandoffQueue, client: Any) -> None:
    holder = queue.acquire("stranded", ttl=5)
    queue.park("stranded", "old", b"old", max_queued=10)
    client.delete(queue.redlock.keyspace.lock("stranded"))  # the holder died and its lease ran out
    with pytest.raises(LockBusy) as caught:
        queue.acquire("stranded", ttl=5)
    handoff = caught.value.handoff  # type: ignore[attr-defined]
    assert handoff.ticket == "old"
    assert queue.park("stranded", "new", b"new", max_queued=10) == "new"
    assert queue.queued("stranded") == ["old", "new"]
    holder.release()  # no longer ours: changes nothing


def test_coalesce_folds_into_the_newest_waiting_ticket(queue: HandoffQueue) -> None:
    holder = queue.acquire("c", ttl=5)
    riders = {queue.park("c", f"t{i}", f"p{i}".encode(), max_queued=10, coalesce=True) for i in range(50)}
    assert riders == {"t0"}
    holder.release()
    assert holder.handoff is not None and holder.handoff.payload == b"p49"
    # While t0's handoff is in flight, a new request starts a new turn.
    assert queue.park("c", "late", b"late", max_queued=10, coalesce=True) == "late"
    run = queue.acquire("c", ttl=5, ticket="t0")
    assert queue.park("c", "later", b"later", max_queued=10, coalesce=True) == "late"
    run.release()
    assert run.handoff is not None and (run.handoff.ticket, run.handoff.payload) == ("late", b"later")


def test_a_full_queue_refuses(queue: HandoffQueue) -> None:
    holder = queue.acquire("full", ttl=5)
    queue.park("full", "a", b"a", max_queued=2)
    queue.park("full", "b", b"b", max_queued=2)
    with pytest.raises(QueueFull, match="max_queued=2"):
        queue.park("full", "c", b"c", max_queued=2)
    holder.release()


def test_park_on_a_free_key_says_acquire_instead(queue: HandoffQueue) -> None:
    assert queue.park("free", "t", b"x", max_queued=5) is None
    assert queue.queued("free") == []


def test_a_dead_holder_is_released_by_owner_prefix_with_handoff(queue: HandoffQueue) -> None:
    holder = queue.acquire("dead", ttl=30, owner_prefix="task-1/w1/")
    queue.park("dead", "next", b"n", max_queued=5)
    released, handoff = queue.release_owner("dead", "task-1/w1/", ttl=30)
    assert released and handoff is not None and handoff.ticket == "next"
    assert holder.release() is False


def test_queues_need_a_single_node(redis_nodes3: RedisCluster) -> None:
    with pytest.raises(ValueError, match="single"):
        HandoffQueue(Redlock(redis_nodes3.urls))
