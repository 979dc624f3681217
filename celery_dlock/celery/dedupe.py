"""Done-markers: a task id that succeeded is not run again (``dedupe_completed``).

With ``acks_late`` a message is acked only after its body returns, so a
worker that dies between the two, or a Redis broker whose
``visibility_timeout`` passes first, delivers the same task id again.  With
``dedupe_completed=True`` (or ``dlock_dedupe_completed``) the run writes
``done:<task id>`` (:meth:`~celery_dlock.lock.keyspace.Keyspace.done`) to
every lock node once its body has succeeded, before it releases the lock,
for ``dlock_dedupe_ttl`` seconds.  A later copy checks it once it holds the
lock, so the check and the first run's write never race, and if any node
has it the copy is acked without running (``Ignore``).  The marker is
written to a quorum and read from every node, so that any quorum that
answers includes a node that has it.
"""

from __future__ import annotations

import logging

from ..lock.errors import LockUnavailable
from ..lock.quorum import Quorum
from ..lock.redlock import Redlock
from ..lock.resp import pack

__all__ = ["completed", "mark_completed"]

logger = logging.getLogger(__name__)


def _quorum(redlock: Redlock) -> Quorum:
    return Quorum(redlock.nodes, socket_timeout=redlock.socket_timeout)


def completed(redlock: Redlock, task_id: str) -> bool:
    """Whether any lock node holds the done-marker of ``task_id``.

    Raises :class:`LockUnavailable` when too few nodes answer to tell: a
    quorum of them would hold a marker that was written.
    """
    quorum = _quorum(redlock)
    replies = quorum.read_all(pack("EXISTS", redlock.keyspace.done(task_id)))
    if any(reply == 1 for reply in replies):
        return True
    answered = sum(1 for reply in replies if isinstance(reply, int))
    if answered < quorum.size:
        raise LockUnavailable.for_key(
            task_id,
            attempts=1,
            errors=quorum.errors(replies),
            reason="too few lock nodes answered to read the done-marker",
        )
    return False


def mark_completed(redlock: Redlock, task_id: str, ttl: float) -> bool:
    """Write the done-marker of ``task_id`` for ``ttl`` seconds; whether a quorum stored it."""
    command = pack("SET", redlock.keyspace.done(task_id), "1", "PX", max(1, round(ttl * 1000)))
    quorum = _quorum(redlock)
    stored = quorum.agreeing(quorum.broadcast(command, granted=_ok), _ok)
    if not stored:
        logger.warning("the done-marker of task %s reached too few lock nodes; a redelivery may run it again", task_id)
    return stored


def _ok(reply: object) -> bool:
    return reply in (b"OK", "OK")
