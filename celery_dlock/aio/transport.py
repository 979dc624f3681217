"""The async driver of :mod:`celery_dlock.lock.plans`: a plan's requests carried out on an event loop.

A :class:`~celery_dlock.lock.plans.Fan` sends its command to every target at
once, each in a task of its own, and returns as soon as the plan's rule says
enough replies are in: a hung node holds up only its own task, which its
``socket_timeout`` ends.  A :class:`~celery_dlock.lock.plans.Listen`
subscribes to the key's release channel on every node
(:class:`ReleaseListener`), and a :class:`~celery_dlock.lock.plans.Pause`
sleeps until a release arrives on any of them or the delay is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from ..lock.member import NO_REPLY, Reply
from ..lock.plans import Done, Fan, Listen, Pause, Plan, advance
from ..lock.resp import pack
from .node import AsyncNode

__all__ = ["ReleaseListener", "background", "drive", "fan"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Tasks nobody awaits any more (replies past a quorum, cleanups): kept alive until done.
_BACKGROUND: set[asyncio.Future[Any]] = set()


def background(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``work`` in a task that lives until it is done, awaited or not."""
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


async def fan(nodes: Sequence[AsyncNode], request: Fan) -> list[Reply]:
    """Write ``request`` to its targets at once; the replies (aligned) once it is decided.

    A target still silent after its ``socket_timeout`` gets a timeout error
    (and its connection is dropped); one silent when the outcome is decided
    keeps :data:`~celery_dlock.lock.member.NO_REPLY`, its reply read later in order.
    """
    replies: list[Reply] = [NO_REPLY] * len(request.targets)
    places: dict[asyncio.Future[Reply], int] = {
        nodes[i].submit(request.command): place for place, i in enumerate(request.targets)
    }
    pending: set[asyncio.Future[Reply]] = set(places)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max((node.socket_timeout for node in nodes), default=0.0)
    while pending and not request.decided(replies):
        left = deadline - loop.time()
        if left <= 0:
            for reply in pending:
                place = places[reply]
                nodes[request.targets[place]].expire(reply)
                replies[place] = reply.result()
            break
        done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for reply in done:
            replies[places[reply]] = reply.result()
    return replies


async def drive(plan: Plan[T], nodes: Sequence[AsyncNode]) -> T:
    """Carry out ``plan`` over ``nodes`` and return its outcome (or raise its error)."""
    listener: ReleaseListener | None = None
    answer: Any = None
    try:
        while True:
            match advance(plan, answer):
                case Done(value=outcome):
                    return outcome
                case Fan() as request:
                    answer = await fan(nodes, request)
                case Listen(channel=channel):
                    listener = await ReleaseListener.subscribe(nodes, channel)
                    answer = listener is not None
                case Pause(delay=delay) if listener is not None:
                    answer = await listener.wait(delay)
                case Pause(delay=delay):
                    answer = await asyncio.sleep(delay, None)
    finally:
        if listener is not None:
            await asyncio.shield(background(listener.close()))


class ReleaseListener:
    """Subscriptions to a key's release channel on every node that accepts one, on this event loop.

    As in the sync :class:`~celery_dlock.lock.waiting.ReleaseWaiter`, each
    node publishes its own release, so listening on all of them wakes a
    waiter on the first release any node applies.
    """

    def __init__(self, connections: Sequence[AbstractConnection]) -> None:
        self._connections = list(connections)
        self._reads: dict[AbstractConnection, asyncio.Task[Any]] = {}

    @classmethod
    async def subscribe(cls, nodes: Sequence[AsyncNode], channel: str) -> ReleaseListener | None:
        """A listener on each node that accepts the subscription (each within its timeout); ``None`` if none does."""
        command = pack("SUBSCRIBE", channel)
        made = await asyncio.gather(*(_subscribed(node, command) for node in nodes))
        connections = [conn for conn in made if conn is not None]
        return cls(connections) if connections else None

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a release on any node; True if one came."""
        for conn in self._connections:
            if conn not in self._reads:
                self._reads[conn] = background(conn.read_response())
        if not self._reads:
            await asyncio.sleep(timeout)
            return False
        done, _ = await asyncio.wait(self._reads.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        woken = False
        for conn, read in list(self._reads.items()):
            if read in done:
                del self._reads[conn]
                if read.exception() is None:
                    woken = True
                else:
                    self._connections.remove(conn)
                    await conn.disconnect()
        return woken

    async def close(self) -> None:
        """Drop every subscription's connection."""
        for read in self._reads.values():
            read.cancel()
        self._reads = {}
        for conn in self._connections:
            await conn.disconnect()
        self._connections = []


async def _subscribed(node: AsyncNode, command: bytes) -> AbstractConnection | None:
    conn = node.new_connection()
    try:
        await asyncio.wait_for(_send_subscribe(conn, command), node.socket_timeout)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        await conn.disconnect()
        logger.debug("cannot listen for releases on %s: %r", node.name, exc)
        return None
    return conn


async def _send_subscribe(conn: AbstractConnection, command: bytes) -> Any:
    await conn.connect()  # type: ignore[no-untyped-call]
    await conn.send_packed_command(command, check_health=False)
    return await conn.read_response()
