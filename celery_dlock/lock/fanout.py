"""One-thread concurrent fan-out: a command to every node, replies read as they arrive.

:func:`fan_out` sends a command to every node before reading any reply, then
reads replies in the order they arrive and stops as soon as the outcome is
decided.  A reply left unread is not lost: the connection counts it as stale
and skips it before the next reply it reads (see
:class:`~celery_dlock.lock.nodes.Node`), so a slow or hung node never delays
a decision that a quorum has already made.  :class:`Readiness` is the
readiness primitive every worker pool supports.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .member import NO_REPLY, Member, Reply

__all__ = ["Readiness", "fan_out"]


def fan_out(
    calls: Sequence[tuple[Member, bytes]],
    *,
    decided: Callable[[list[Reply]], bool],
    timeout: float,
) -> list[Reply]:
    """Send every call at once, then gather replies until ``decided`` says so.

    ``decided`` is given the replies so far, aligned with ``calls``, each one a
    value, an exception or :data:`NO_REPLY`.  Nodes still silent when it
    returns true keep :data:`NO_REPLY`; nodes silent after ``timeout`` seconds
    get a :class:`redis.TimeoutError`.  Either way their replies are skipped on
    the next use.
    """
    replies: list[Reply] = [NO_REPLY] * len(calls)
    waiting: list[int] = []
    for index, (node, packed) in enumerate(calls):
        try:
            node.send(packed)
        except RedisError as exc:
            replies[index] = exc
        else:
            waiting.append(index)

    if not waiting or decided(replies):
        for index in waiting:
            calls[index][0].abandon()
        return replies
    if len(calls) == 1:
        replies[0] = calls[0][0].read(block=True)
        return replies

    deadline = time.monotonic() + timeout
    readiness = Readiness()
    by_fd: dict[int, int] = {}
    for index in waiting:
        fd = calls[index][0].fileno()
        by_fd[fd] = index
        readiness.add(fd)
    while waiting and not decided(replies):
        left = deadline - time.monotonic()
        ready = readiness.wait(left) if left > 0 else []
        if not ready:
            for index in waiting:
                replies[index] = RedisTimeoutError(f"no reply within {timeout}s")
            break
        for fd in ready:
            found = by_fd.get(fd)
            if found is None or found not in waiting:
                continue  # eventlet's green select can report a descriptor it was not given
            index = found
            reply = calls[index][0].read()
            if reply is not NO_REPLY:
                replies[index] = reply
                waiting.remove(index)
                readiness.remove(fd)
    for index in waiting:
        calls[index][0].abandon()
    return replies


class Readiness:
    """Which of some sockets have data to read: ``poll`` where the pool has it, else ``select``.

    Eventlet's green ``select`` module has no ``poll``, and it replaces the
    real one in place when it monkey-patches, so the choice is made per use.
    gevent's green ``poll`` and the standard one are used as they are.
    """

    __slots__ = ("_fds", "_poller")

    def __init__(self) -> None:
        poll = getattr(select, "poll", None)
        self._poller = poll() if poll is not None else None
        self._fds: set[int] = set()

    def add(self, fd: int) -> None:
        """Watch ``fd`` for data."""
        if self._poller is not None:
            self._poller.register(fd, select.POLLIN)
        self._fds.add(fd)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``."""
        if self._poller is not None:
            self._poller.unregister(fd)
        self._fds.discard(fd)

    def wait(self, timeout: float) -> list[int]:
        """The watched descriptors with data, waiting up to ``timeout`` seconds for one."""
        if self._poller is not None:
            return [fd for fd, _ in self._poller.poll(timeout * 1000)]
        readable, _, _ = select.select(list(self._fds), [], [], timeout)
        return readable
