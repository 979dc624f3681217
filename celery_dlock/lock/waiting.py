"""Waiting for a held key: the retry schedule, woken early by the holder's release.

Every release publishes on the key's channel
(:meth:`~celery_dlock.lock.keyspace.Keyspace.released`); a waiter subscribes
to it before its next attempt and sleeps until a message or its retry delay.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from redis.exceptions import RedisError

from .errors import LockBusy, LockUnavailable
from .nodes import Connection, Node
from .resp import pack

__all__ = ["ReleaseWaiter", "Retries"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


class ReleaseWaiter:
    """A subscription to a key's release channel on one node."""

    def __init__(self, node: Node, channel: str) -> None:
        self._conn: Connection = node.new_connection()
        try:
            self._conn.send_packed_command([pack("SUBSCRIBE", channel)], check_health=False)
            self._conn.read_response()
        except BaseException:
            self._conn.disconnect()
            raise

    @classmethod
    def subscribe(cls, nodes: Sequence[Node], channel: str) -> ReleaseWaiter | None:
        """A waiter on the first of ``nodes`` that accepts the subscription, if any."""
        for node in nodes:
            try:
                return cls(node, channel)
            except (RedisError, OSError) as exc:
                logger.debug("cannot listen for releases on %s: %r", node.name, exc)
        return None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a release; True if one came."""
        try:
            if self._conn.can_read(timeout):
                self._conn.read_response()
                return True
        except (RedisError, OSError):
            time.sleep(timeout)
        return False

    def close(self) -> None:
        """Drop the subscription's connection."""
        self._conn.disconnect()


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

    def run(
        self,
        attempt: Callable[[int], T | LockBusy | LockUnavailable],
        subscribe: Callable[[], ReleaseWaiter | None],
    ) -> T:
        """Call ``attempt(n)`` until it returns a result, raising its last error once out of tries."""
        attempts = 0
        waiter: ReleaseWaiter | None = None
        try:
            while True:
                attempts += 1
                outcome = attempt(attempts)
                if not isinstance(outcome, (LockBusy, LockUnavailable)):
                    return outcome
                now = time.monotonic()
                out_of_time = now >= self.deadline if self.deadline is not None else attempts > self.retry_count
                if not self.blocking or out_of_time:
                    raise outcome
                delay = self.retry_delay + random.uniform(0, self.retry_jitter)
                if self.deadline is not None:
                    delay = min(delay, self.deadline - now)
                if isinstance(outcome, LockBusy):
                    if waiter is None:
                        # Listen first, then look again, so a release between
                        # the attempt and the subscription is not missed.
                        waiter = subscribe()
                        if waiter is not None:
                            continue
                    if outcome.retry_after is not None:
                        delay = min(delay, outcome.retry_after)
                if waiter is not None:
                    waiter.wait(delay)
                else:
                    time.sleep(delay)
        finally:
            if waiter is not None:
                waiter.close()
