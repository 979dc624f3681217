"""Releases that could not reach a node, sent to it again in the background.

A holder's last release is owner-checked and its owner value is never used
again, so sending it twice is harmless, while a release
that never arrives leaves the node holding the lock until its lease runs
out: a node restarted with ``appendfsync always`` comes back holding every
lock it had.  :class:`Resender` takes the nodes whose send or reply failed
with a connection error or a timeout and sends the same command to them
again from the watchdog thread, a few times with a growing pause, never on
the caller's path.  Never for the undo of a failed attempt, whose owner
the next attempt reuses (see ``Redlock._undo``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Final

import redis

from .member import Member, Reply
from .quorum import Quorum

__all__ = ["RESEND_ATTEMPTS", "RESEND_FIRST_DELAY", "Resender"]

logger = logging.getLogger(__name__)

#: How many times a release is sent again to a node it could not reach.
RESEND_ATTEMPTS: Final = 5
#: Seconds before the first resend; each further one waits twice as long (about 3 s in all).
RESEND_FIRST_DELAY: Final = 0.1


class Resender:
    """Sends a command again to the nodes it did not reach, on ``schedule`` (the watchdog's timer)."""

    def __init__(self, quorum: Quorum, schedule: Callable[[float, Callable[[], None]], None]) -> None:
        self._quorum = quorum
        self._schedule = schedule

    def resend_unreached(self, command: bytes, nodes: Sequence[Member], replies: Sequence[Reply]) -> None:
        """Send ``command`` again to each of ``nodes`` whose reply (aligned) says it was not reached."""
        unreached = [node for node, reply in zip(nodes, replies, strict=True) if _unreached(reply)]
        if unreached:
            self._schedule(RESEND_FIRST_DELAY, functools.partial(self._attempt, command, unreached, 1))

    def _attempt(self, command: bytes, nodes: Sequence[Member], attempt: int) -> None:
        replies = self._quorum.read_all(command, nodes)
        left = [node for node, reply in zip(nodes, replies, strict=True) if _unreached(reply)]
        if not left:
            logger.debug("a release reached %s on attempt %d", [node.name for node in nodes], attempt + 1)
        elif attempt < RESEND_ATTEMPTS:
            retry = functools.partial(self._attempt, command, left, attempt + 1)
            self._schedule(RESEND_FIRST_DELAY * 2**attempt, retry)
        else:
            logger.warning("a release never reached %s; it holds the lock until its lease ends", left)


def _unreached(reply: Reply) -> bool:
    """A reply that says the command may not have arrived: a connection error or a timeout."""
    return isinstance(reply, (redis.ConnectionError, redis.TimeoutError))
