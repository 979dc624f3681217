"""Waking a blocked acquirer when the holder releases, instead of polling alone.

Every release publishes on the key's channel
(:meth:`~celery_dlock.lock.keyspace.Keyspace.released`); a waiter subscribes
to it before its next attempt and sleeps until a message or its retry delay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from redis.exceptions import RedisError

from .nodes import Connection, Node
from .resp import pack

__all__ = ["ReleaseWaiter"]

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
