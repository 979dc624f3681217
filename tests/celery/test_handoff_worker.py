"""Handoff queues (``on_busy="queue"`` and ``"coalesce"``) under real prefork workers.

Every test runs real ``celery worker -P prefork -c 4`` subprocesses
(:class:`support.workers.CeleryWorker`) on the tasks of :mod:`worker_app`,
against real redis-server processes (:mod:`support.worker_stack`): the broker, results and
recorder on one, the lock node, which also holds the handoff queues, on
another.

Order is checked against the *park order*: the order in which the lock node
appended tickets to the key's queue ``dlock:queue:<key>``, read with MONITOR
as the Lua scripts run (:class:`ParkWatcher`).  The broker hands messages to
four pool processes at once, so messages reach the lock in a slightly
different order from the one they were published in; what the plugin
guarantees is that parked messages run in the order they parked.

The drain tests print their times (run with ``-s``): drain time is from the
first body's start to the last body's end, against the sum of the bodies'
own times.  They assert no timing: speed is the business of the benchmarks
(``python -m benchmarks --scenario contention``), which measure the policies
side by side, round by round.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from celery import states
from celery.result import AsyncResult
from support.stored import stored_owner
from support.worker_stack import KEY_PREFIX, Stack, new_key

from celery_dlock import LockBusy, QueueFull
from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.polling import wait_until

pytestmark = [pytest.mark.worker, pytest.mark.timeout(180)]


#: A queue that the module's worker consumes besides Celery's default one.
ROUTED_QUEUE = "dlock-routed"
#: A header of the caller's that a handed-off message must keep (``worker_app.CUSTOM_HEADER``).
CUSTOM_HEADER = "x-dlock-test"


# -- watching the lock node ----------------------------------------------------------------


class ParkWatcher:
    """Records, in order, the tickets appended to the handoff queue of one key.

    A MONITOR connection to the lock node sees every command the Lua
    scripts run, in the order the node executes them; the park script's
    ``RPUSH <prefix>queue:<key> <ticket>`` is the moment a message joins
    the queue.
    """

    def __init__(self, lock_url: str, key: str) -> None:
        parts = urlsplit(lock_url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.pattern = re.compile(
            rb'\[\d+ lua\] "rpush" "' + re.escape(f"{KEY_PREFIX}queue:{key}".encode()) + rb'" "([^"]+)"',
            re.IGNORECASE,
        )
        self.tickets: list[str] = []
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ParkWatcher:
        sock = socket.create_connection(self.address, timeout=5)
        sock.sendall(b"MONITOR\r\n")
        first = b""
        while not first.endswith(b"\r\n"):
            first += sock.recv(64)
        assert first.startswith(b"+OK"), first
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name="park-watcher", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._sock is not None
        pending = b""
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            for line in lines:
                match = self.pattern.search(line)
                if match:
                    self.tickets.append(match.group(1).decode())

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.2)  # let the last lines arrive
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """One stack with one prefork worker (concurrency 4) consuming two queues, sweeping every 0.5 s."""
    made = make_stack(env={"DLOCK_TEST_SWEEP_INTERVAL": "0.5"})
    made.worker(concurrency=4, queues=["celery", ROUTED_QUEUE])
    return made


def results_of(stack: Stack, sent: list[AsyncResult], timeout: float) -> list[AsyncResult]:
    """Wait until every result is ready (whatever its outcome)."""
    deadline = time.monotonic() + timeout
    for result in sent:
        stack.result(result, timeout=max(1.0, deadline - time.monotonic()))
    return sent


def run_ids(stack: Stack, key: str) -> list[str]:
    """The task ids of the bodies run on ``key``, in the order they took the lock."""
    return [run["id"] for run in stack.runs(key=key)]


def assert_ran_once_in_turn(stack: Stack, key: str, ids: list[str]) -> None:
    """Each of ``ids`` ran exactly once, no two bodies overlapped, nothing is left behind."""
    wait_until(
        lambda: len(stack.sections(key)) >= len(ids),
        30,
        message=lambda: f"{len(ids)} sections on {key}; have {len(stack.sections(key))}\n{stack.logs()}",
    )
    counts = Counter(run_ids(stack, key))
    assert counts == Counter(ids), (counts - Counter(ids), Counter(ids) - counts)
    sections = stack.sections(key)
    assert len(sections) == len(ids)
    assert overlaps(sections) == []
    assert falling_tokens(sections) == []
    assert stack.counter(key) == len(ids)  # no lost read-modify-write update
    wait_until(lambda: not stack.lock_exists(key), 10, message=f"the lock of {key} to go")
    assert stack.locks.llen(f"{KEY_PREFIX}queue:{key}") == 0
    assert stack.locks.hlen(f"{KEY_PREFIX}parked:{key}") == 0


def drain_times(stack: Stack, key: str) -> tuple[float, float, list[float]]:
    """First body start to last body end, sum of body durations (seconds), and the gaps between bodies (ms)."""
    sections = sorted(stack.sections(key), key=lambda s: s.enter)
    span = sections[-1].exit - sections[0].enter
    busy = sum(s.exit - s.enter for s in sections)
    gaps = [(after.enter - before.exit) / 1e6 for before, after in itertools.pairwise(sections)]
    return span / 1e9, busy / 1e9, gaps


@contextmanager
def flag_set_on_exit(stack: Stack, flag: str) -> Iterator[str]:
    """A flag that releases the bodies waiting for it, set however the block ends."""
    try:
        yield flag
    finally:
        stack.recorder.set(flag, 1)


def start_holder(stack: Stack, name: str, key: str, flag: str, **options: Any) -> tuple[AsyncResult, dict[str, Any]]:
    """Send a task whose body holds ``key`` until ``flag`` is set; wait until it runs."""
    result = stack.app.send_task(name, args=(key,), kwargs={"flag": flag}, **options)
    (run,) = stack.wait_run(result.id)
    return result, run


def wait_parked(stack: Stack, key: str, count: int, timeout: float = 20.0) -> list[str]:
    """Wait until ``count`` tickets are parked on ``key``; returns them, oldest first."""
    queue = stack.keyspace.queue(key)
    wait_until(
        lambda: stack.locks.llen(queue) >= count,
        timeout,
        message=lambda: f"{count} parked on {key}; have {stack.locks.llen(queue)}\n{stack.logs()}",
    )
    return [ticket.decode() if isinstance(ticket, bytes) else ticket for ticket in stack.locks.lrange(queue, 0, -1)]


def ready(results: list[AsyncResult]) -> list[AsyncResult]:
    return [r for r in results if r.state in states.READY_STATES]


# -- FIFO drain ---------------------------------------------------------------------------------

DRAIN_MESSAGES = 200
DRAIN_BODY = 0.02
DRAIN_TASKS = {"queue": "wa.queue_section", "requeue": "wa.requeue_section", "wait": "wa.wait_section"}
#: (drain time, sum of body times) per policy, for the comparison printed.
_drains: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize("policy", list(DRAIN_TASKS))
def test_a_burst_on_one_key_runs_each_message_once(stack: Stack, policy: str) -> None:
    """200 messages of ~20 ms on one key, published at once.

    Every policy runs each message exactly once, never two at a time.  With
    ``queue``, the messages that parked run in park order.  ``requeue``
    (countdowns 0.02 to 0.2 s) and ``wait`` run the same workload.
    """
    key = new_key(f"drain-{policy}")
    with ParkWatcher(stack.lock_urls[0], key) as watcher:
        sent = [stack.send(DRAIN_TASKS[policy], key, DRAIN_BODY) for _ in range(DRAIN_MESSAGES)]
        results = results_of(stack, sent, timeout=120)
    assert [r.state for r in results] == [states.SUCCESS] * DRAIN_MESSAGES, stack.logs()
    published = [r.id for r in sent]
    assert_ran_once_in_turn(stack, key, published)

    order = run_ids(stack, key)
    span, busy, gaps = drain_times(stack, key)
    _drains[policy] = (span, busy)
    summary = (
        f"\n{policy} drain: {DRAIN_MESSAGES} x {DRAIN_BODY * 1000:.0f} ms: first start to last end {span:.3f}s, "
        f"sum of bodies {busy:.3f}s, ratio {span / busy:.3f}; gaps between bodies: median "
        f"{statistics.median(gaps):.1f} ms, mean {statistics.mean(gaps):.1f} ms, longest {max(gaps):.1f} ms"
    )
    if policy != "queue":
        assert watcher.tickets == []  # nothing parks
        if "queue" in _drains:
            summary += f"; {policy}/queue drain time {span / _drains['queue'][0]:.2f}"
        print(summary)
        return

    parked = watcher.tickets
    handed_off = {r.id for r in results if r.result["ticket"]}
    assert len(set(parked)) == len(parked)  # a ticket parks once
    assert set(parked) == handed_off  # exactly the parked messages came back, claiming with a ticket
    assert [task_id for task_id in order if task_id in handed_off] == parked  # FIFO: run order is park order
    # Only a message that found the key free and its queue empty ran without
    # parking: the first, and any arriving while the queue was empty.
    assert len(parked) >= DRAIN_MESSAGES * 9 // 10, len(parked)

    position = {task_id: n for n, task_id in enumerate(published)}
    displacement = [n - position[task_id] for n, task_id in enumerate(order)]
    print(
        f"{summary}; {len(parked)} parked; run (= park) order vs publish order: "
        f"max displacement {max(map(abs, displacement))} places, {sum(1 for d in displacement if d)} "
        f"of {len(order)} messages out of place"
    )


def test_a_parked_queue_drains_in_order(stack: Stack) -> None:
    """The same 200 messages, all parked behind one holder before the drain starts.

    The queue is read in one snapshot before the holder lets go, so the
    order checked needs no watcher; the drain time shows the cost of the
    handoffs alone, with no burst of not-yet-parked messages ahead of them
    in the broker.
    """
    key = new_key("drain-parked")
    with flag_set_on_exit(stack, f"flag:{key}") as flag:
        holder, _ = start_holder(stack, "wa.queue_section", key, flag)
        sent = [stack.send("wa.queue_section", key, DRAIN_BODY) for _ in range(DRAIN_MESSAGES)]
        parked = wait_parked(stack, key, DRAIN_MESSAGES, timeout=60)
    results = results_of(stack, [holder, *sent], timeout=120)
    assert [r.state for r in results] == [states.SUCCESS] * (DRAIN_MESSAGES + 1), stack.logs()
    assert_ran_once_in_turn(stack, key, [holder.id] + [r.id for r in sent])

    order = run_ids(stack, key)
    assert order == [holder.id, *parked]
    assert all(r.result["ticket"] == f"{r.id}@0" for r in sent)
    sections = sorted(stack.sections(key), key=lambda s: s.enter)[1:]  # without the holder
    span = (sections[-1].exit - sections[0].enter) / 1e9
    busy = sum(s.exit - s.enter for s in sections) / 1e9
    gaps = [(after.enter - before.exit) / 1e6 for before, after in itertools.pairwise(sections)]
    published = {r.id: n for n, r in enumerate(sent)}
    displacement = max(abs(n - published[task_id]) for n, task_id in enumerate(parked))
    print(
        f"\nparked-first drain: {DRAIN_MESSAGES} x {DRAIN_BODY * 1000:.0f} ms: {span:.3f}s, sum of bodies "
        f"{busy:.3f}s, ratio {span / busy:.3f}, median gap {statistics.median(gaps):.1f} ms; "
        f"park order vs publish order: max displacement {displacement}"
    )


# -- a holder that dies -------------------------------------------------------------------------


def test_kill_9_of_the_holder_hands_the_queue_on(stack: Stack) -> None:
    """The main process's WorkerLostError hook hands the key to the next parked message."""
    worker = stack.workers[0]
    key = new_key("kill9")
    followers = 6
    with flag_set_on_exit(stack, f"flag:{key}") as flag, ParkWatcher(stack.lock_urls[0], key) as watcher:
        holder, run = start_holder(stack, "wa.queue_section", key, flag)  # ttl=30
        sent = [stack.send("wa.queue_section", key, DRAIN_BODY) for _ in range(followers)]
        wait_parked(stack, key, followers)
        assert stack.lock_pttl(key) > 20_000  # expiry cannot be what frees it
        assert run["pid"] in worker.pool_pids()

        killed_at = time.monotonic()
        os.kill(run["pid"], signal.SIGKILL)
        results_of(stack, sent, timeout=30)
        elapsed = time.monotonic() - killed_at

    assert [r.state for r in sent] == [states.SUCCESS] * followers, stack.logs()
    assert elapsed < 15  # handed on at once, not after the ttl (30 s) and a sweep
    stack.result(holder)
    assert holder.state == states.FAILURE
    assert type(holder.result).__name__ == "WorkerLostError"
    worker.wait_for_log(rf"released the lock of wa\.queue_section\[{holder.id}\]")

    ids = [r.id for r in sent]
    assert Counter(run_ids(stack, key)) == Counter([holder.id, *ids])  # the holder started once, never again
    assert run_ids(stack, key)[1:] == watcher.tickets  # the followers ran in park order
    assert sorted(watcher.tickets) == sorted(ids)
    sections = stack.sections(key)
    assert len(sections) == followers  # the killed body never ended
    assert overlaps(sections) == []
    assert not stack.lock_exists(key)


def test_kill_9_at_the_moment_of_handoff(stack_factory: Callable[..., Stack]) -> None:
    """A holder dies after its release reserved the key for the next message, before publishing it.

    The holder runs alone in a worker whose processes die at the fault point
    ``before-handoff-publish`` (it consumes a queue of its own, and never
    sweeps, so only that one handoff reaches the fault point); the followers
    park in a healthy worker, whose sweep hands the reserved ticket on once
    the reservation (the holder's ttl, 2 s) runs out.
    """
    stack = stack_factory(env={"DLOCK_TEST_SWEEP_INTERVAL": "0.5"})
    healthy = stack.worker(concurrency=4)
    faulty = stack.worker(
        concurrency=4,
        queues=["dlock-faulty"],
        env={"DLOCK_FAULT_POINTS": "before-handoff-publish", "DLOCK_TEST_SWEEP_INTERVAL": "3600"},
    )
    key = new_key("fault")
    followers = 5
    with flag_set_on_exit(stack, f"flag:{key}") as flag, ParkWatcher(stack.lock_urls[0], key) as watcher:
        holder, run = start_holder(stack, "wa.queue_short_ttl", key, flag, queue="dlock-faulty")  # ttl=2
        assert run["hostname"] == faulty.hostname
        sent = [stack.send("wa.queue_section", key, DRAIN_BODY) for _ in range(followers)]
        wait_parked(stack, key, followers)

        stack.recorder.set(flag, 1)  # the holder's body ends; its release reserves the key, then it dies
        stack.result(holder)
        died_at = time.monotonic()
        results_of(stack, sent, timeout=30)

    assert holder.state == states.FAILURE
    assert type(holder.result).__name__ == "WorkerLostError"
    assert [r.state for r in sent] == [states.SUCCESS] * followers, stack.logs()
    assert time.monotonic() - died_at < 20
    faulty.wait_for_log(r"exited with 'signal 9 \(SIGKILL\)'")
    # Nobody published the reserved ticket before its reservation (ttl=2 s from
    # the release, which came after the holder's body ended) ran out.
    holder_section, first_section = sorted(stack.sections(key), key=lambda s: s.enter)[:2]
    assert (first_section.enter - holder_section.exit) / 1e9 >= 1.9
    healthy.wait_for_log(r"handed on 1 parked message\(s\) whose holder had gone")
    assert faulty.running  # its main process never reached the fault point: it had nothing to publish

    ids = [r.id for r in sent]
    assert Counter(run_ids(stack, key)) == Counter([holder.id, *ids])  # no loss, no double run
    assert run_ids(stack, key)[1:] == watcher.tickets
    assert sorted(watcher.tickets) == sorted(ids)
    assert {stack.runs(task_id=i)[0]["hostname"] for i in ids} == {healthy.hostname}
    sections = stack.sections(key)
    assert len(sections) == followers + 1  # the holder's body ended before its release
    assert overlaps(sections) == []
    assert stack.counter(key) == followers + 1
    wait_until(lambda: not stack.lock_exists(key), 10, message="the lock to go")


# -- a message delivered more than once ----------------------------------------------------------


def test_a_parked_message_published_again_runs_once(stack: Stack) -> None:
    """Copies of a parked message carrying its ticket: before, during and after its handoff.

    The parked message is routed to a queue that the worker consumes only
    when told to, so its handed-off copy waits in the broker, the key
    reserved for it, while two more copies with the same ticket are
    published beside it.
    """
    worker = stack.workers[0]
    control = stack.app.control
    key = new_key("dup")
    side_queue = f"dlock-dup-{key}"
    with flag_set_on_exit(stack, f"flag:{key}") as flag:
        holder, _ = start_holder(stack, "wa.queue_section", key, flag)
        control.add_consumer(side_queue, destination=[worker.hostname], reply=True)
        message = stack.send("wa.queue_section", key, DRAIN_BODY, queue=side_queue)
        assert wait_parked(stack, key, 1) == [message.id]
        control.cancel_consumer(side_queue, destination=[worker.hostname], reply=True)
        ticket_header = {"dlock_ticket": f"{message.id}@0"}

        # A copy arriving while the holder still holds: its ticket stays parked.
        stack.send("wa.queue_section", key, DRAIN_BODY, task_id=message.id, headers=ticket_header)
        wait_until(lambda: worker.log.count(f"wa.queue_section[{message.id}] ignored") >= 2, 15,
                   message=lambda: f"the early copy ignored\n{stack.logs()}")  # fmt: skip
        assert stack.runs(task_id=message.id) == []
        assert stack.locks.lrange(f"{KEY_PREFIX}queue:{key}", 0, -1) == [message.id.encode()]
    # The holder's release reserves the key and publishes the copy to the side queue.
    wait_until(
        lambda: stored_owner(stack.locks, f"{KEY_PREFIX}lock:{key}") == f"park:{message.id}",
        15,
        message=lambda: f"the key reserved for {message.id}\n{stack.logs()}",
    )
    for _ in range(2):  # the handoff, published again beside it (a retried handoff, a sweep)
        stack.send("wa.queue_section", key, DRAIN_BODY, task_id=message.id, queue=side_queue, headers=ticket_header)
    control.add_consumer(side_queue, destination=[worker.hostname], reply=True)
    try:
        stack.result(message)
        wait_until(lambda: worker.log.count(f"handed-off wa.queue_section[{message.id}]") >= 2, 15,
                   message=lambda: f"two copies dropped\n{stack.logs()}")  # fmt: skip
        # A copy arriving after the run: its ticket is gone.
        stack.send("wa.queue_section", key, DRAIN_BODY, task_id=message.id, headers=ticket_header)
        wait_until(lambda: worker.log.count(f"handed-off wa.queue_section[{message.id}]") >= 3, 15,
                   message=lambda: f"the late copy dropped\n{stack.logs()}")  # fmt: skip
    finally:
        control.cancel_consumer(side_queue, destination=[worker.hostname], reply=True)

    assert message.state == states.SUCCESS
    assert message.result["id"] == message.id and message.result["ticket"] == f"{message.id}@0"
    assert message.result["routing_key"] == side_queue
    assert len(stack.runs(task_id=message.id)) == 1
    assert worker.log.count(f"dropped a second copy of handed-off wa.queue_section[{message.id}]") == 3
    assert_ran_once_in_turn(stack, key, [holder.id, message.id])


# -- coalesce ---------------------------------------------------------------------------------------


def test_coalesce_folds_fifty_requests_into_one_more_run(stack: Stack) -> None:
    """50 requests during one run: exactly one more run, with the 50th request's arguments."""
    key = new_key("coalesce")
    with flag_set_on_exit(stack, f"flag:{key}") as flag, ParkWatcher(stack.lock_urls[0], key) as watcher:
        holder = stack.app.send_task("wa.coalesce_section", args=(key, 0), kwargs={"flag": flag})
        stack.wait_run(holder.id)
        requests = [stack.send("wa.coalesce_section", key, n) for n in range(1, 50)]
        # All but the one that carries the next run have a result once folded.
        wait_until(lambda: len(ready(requests)) == 48, 30, message=lambda: f"48 folded\n{stack.logs()}")
        last = stack.send("wa.coalesce_section", key, 50)  # only now: surely the latest
        wait_until(lambda: last.state == states.SUCCESS, 15, message=lambda: f"the 50th folded\n{stack.logs()}")
        assert len(stack.runs(key=key)) == 1  # the holder still runs
        assert stack.locks.llen(f"{KEY_PREFIX}queue:{key}") == 1
    requests.append(last)
    (carrier,) = [r for r in requests if r.state != states.SUCCESS or "coalesced_into" not in r.result]
    stack.result(carrier)

    assert watcher.tickets == [carrier.id]  # one ticket parked, the others folded into it
    assert carrier.state == states.SUCCESS
    assert carrier.result["id"] == carrier.id
    assert carrier.result["n"] == 50  # the latest request's arguments
    assert carrier.result["ticket"] == f"{carrier.id}@0"
    for request in requests:
        if request is not carrier:
            assert request.state == states.SUCCESS
            assert request.result == {"coalesced_into": carrier.id}
    assert stack.result(holder).result["n"] == 0
    time.sleep(1.0)  # nothing else comes
    assert run_ids(stack, key) == [holder.id, carrier.id]
    assert_ran_once_in_turn(stack, key, [holder.id, carrier.id])


# -- a full queue -------------------------------------------------------------------------------------


def test_a_full_queue_requeues_the_overflow(stack: Stack) -> None:
    """max_queued=3, queue_full="requeue": the overflow is requeued, and everything runs once."""
    worker = stack.workers[0]
    key = new_key("full-requeue")
    with flag_set_on_exit(stack, f"flag:{key}") as flag, ParkWatcher(stack.lock_urls[0], key) as watcher:
        holder, _ = start_holder(stack, "wa.queue_small", key, flag)
        sent = [stack.send("wa.queue_small", key) for _ in range(6)]
        wait_parked(stack, key, 3)

        def requeued() -> set[str]:
            return {r.id for r in sent if f"queue_small[{r.id}]: requeued in" in worker.log}

        wait_until(lambda: len(requeued()) == 3, 20, message=lambda: f"3 requeued\n{stack.logs()}")
        overflow = requeued()
        assert stack.locks.llen(f"{KEY_PREFIX}queue:{key}") == 3
    results_of(stack, sent, timeout=60)

    assert [r.state for r in sent] == [states.SUCCESS] * 6, stack.logs()
    assert "QueueFull" in worker.log or "max_queued=3" in worker.log
    assert_ran_once_in_turn(stack, key, [holder.id] + [r.id for r in sent])
    assert all(stack.runs(task_id=i)[0]["requeues"] >= 1 for i in overflow)
    parked = set(watcher.tickets)
    assert [i for i in run_ids(stack, key) if i in parked] == watcher.tickets  # in park order
    assert set(watcher.tickets[:3]).isdisjoint(overflow)


def test_a_full_queue_rejects_the_overflow(stack: Stack) -> None:
    """max_queued=3, queue_full="reject": the overflow fails with QueueFull, the parked ones run."""
    key = new_key("full-reject")
    with flag_set_on_exit(stack, f"flag:{key}") as flag:
        holder, _ = start_holder(stack, "wa.queue_small_reject", key, flag)
        sent = [stack.send("wa.queue_small_reject", key) for _ in range(6)]
        parked = wait_parked(stack, key, 3)
        wait_until(lambda: len(ready(sent)) == 3, 20, message=lambda: f"3 rejected\n{stack.logs()}")
    results_of(stack, sent, timeout=30)

    rejected = [r for r in sent if r.id not in parked]
    assert len(rejected) == 3
    for result in rejected:
        assert result.state == states.FAILURE
        assert isinstance(result.result, QueueFull) and isinstance(result.result, LockBusy), result.result
        assert "max_queued=3" in str(result.result)
        assert stack.runs(task_id=result.id) == []
    assert [r.state for r in sent if r.id in parked] == [states.SUCCESS] * 3
    assert_ran_once_in_turn(stack, key, [holder.id, *parked])
    assert run_ids(stack, key) == [holder.id, *parked]


# -- task options -----------------------------------------------------------------------------------


def test_a_parked_message_keeps_its_queue_priority_headers_and_id(stack: Stack) -> None:
    """The handed-off copy is consumed from the task's own queue, with its headers, under its id."""
    key = new_key("routed")
    with flag_set_on_exit(stack, f"flag:{key}") as flag:
        holder, _ = start_holder(stack, "wa.queue_section", key, flag)
        follower = stack.send(
            "wa.queue_section", key, DRAIN_BODY, queue=ROUTED_QUEUE, priority=5, headers={CUSTOM_HEADER: "kept"}
        )
        assert wait_parked(stack, key, 1) == [follower.id]
    value = follower.get(timeout=20)  # the caller's own AsyncResult gets the result

    assert value["id"] == follower.id
    assert value["ticket"] == f"{follower.id}@0"  # this is the handed-off copy
    assert value["routing_key"] == ROUTED_QUEUE
    assert value["priority"] == 5
    assert value["custom"] == "kept"
    assert_ran_once_in_turn(stack, key, [holder.id, follower.id])
