"""Waiting for a held key: the retry schedule, woken early by the holder's release.

Every release publishes on the key's channel
(:meth:`~celery_dlock.lock.keyspace.Keyspace.released`); a waiter subscribes
to it before its next attempt and sleeps until a message or its retry delay.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

from redis.exceptions import RedisError

from .errors import LockBusy, LockUnavailable
from .fanout import Readiness
from .member import Connection, Member
from .resp import pack

__all__ = ["ReleaseWaiter", "Retries"]

logger = logging.getLogger(__name__)


class ReleaseWaiter:
    """Subscriptions to a key's release channel on every node that accepts one.

    Each node publishes its own release, so a waiter wakes on the first and
    tries again at once; a node that has not applied a release yet wakes it
    again when it does.  Listening on one node only would miss a release
    that node never saw, and sleep a whole retry delay after it.
    """

    def __init__(self, connections: Sequence[Connection]) -> None:
        self._connections = list(connections)

    @classmethod
    def subscribe(cls, nodes: Sequence[Member], channel: str) -> ReleaseWaiter | None:
        """A waiter on each of ``nodes`` that accepts the subscription; ``None`` if none does."""
        command = pack("SUBSCRIBE", channel)
        connections = []
        for node in nodes:
            try:
                conn = node.new_connection()
            except (RedisError, OSError) as exc:
                logger.debug("cannot listen for releases on %s: %r", node.name, exc)
                continue
            try:
                conn.send_packed_command([command], check_health=False)
                conn.read_response()
            except (RedisError, OSError) as exc:
                conn.disconnect()
                logger.debug("cannot listen for releases on %s: %r", node.name, exc)
                continue
            connections.append(conn)
        return cls(connections) if connections else None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a release on any node; True if one came."""
        if self._read_ready():  # a notice may already sit in a connection's buffer
            return True
        readiness = Readiness()
        for conn in self._connections:
            if conn._sock is not None:
                readiness.add(conn._sock.fileno())
        if not self._connections:
            time.sleep(timeout)
            return False
        # Which descriptor woke us is not trusted (green selects differ); every
        # connection is asked instead.
        return bool(readiness.wait(timeout)) and self._read_ready()

    def close(self) -> None:
        """Drop every subscription's connection."""
        for conn in self._connections:
            conn.disconnect()
        self._connections = []

    def _read_ready(self) -> bool:
        """Read the notice waiting on each connection that has one; True if any did."""
        woken = False
        for conn in list(self._connections):
            try:
                if conn.can_read(0):
                    conn.read_response()
                    woken = True
            except (RedisError, OSError):
                self._drop(conn)
        return woken

    def _drop(self, conn: Connection) -> None:
        conn.disconnect()
        self._connections = [other for other in self._connections if other is not conn]


class Retries:
    """How long an acquirer keeps trying: ``retry_count`` more attempts, or until ``timeout``.

    Each pause is ``retry_delay`` plus up to ``retry_jitter`` at random, cut
    short by the holder's release and never past the holder's lease or the
    deadline.  With ``blocking=False`` one attempt is made.
    """

    def __init__(
        self, retry_count: int, retry_delay: float, retry_jitter: float, *, timeout: float | None, blocking: bool
    ) -> None:
        self.retry_count, self.retry_delay, self.retry_jitter = retry_count, retry_delay, retry_jitter
        self.blocking = blocking
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def pause(self, outcome: LockBusy | LockUnavailable, attempts: int, *, listening: bool) -> tuple[float, bool]:
        """After failed attempt ``attempts``: ``(delay, listen)``, or ``outcome`` raised once out of tries.

        ``listen`` asks the caller, not yet ``listening``, to subscribe to the
        key's releases and, if that works, to try again at once; else it
        waits ``delay`` seconds, woken early by a release when listening.
        """
        now = time.monotonic()
        out_of_time = now >= self.deadline if self.deadline is not None else attempts > self.retry_count
        if not self.blocking or out_of_time:
            raise outcome
        delay = self.retry_delay + random.uniform(0, self.retry_jitter)
        if self.deadline is not None:
            delay = min(delay, self.deadline - now)
        if isinstance(outcome, LockBusy) and outcome.retry_after is not None:
            delay = min(delay, outcome.retry_after)
        return delay, isinstance(outcome, LockBusy) and not listening
