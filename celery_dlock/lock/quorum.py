"""A set of independent nodes and the quorum arithmetic over their replies.

:class:`Quorum` sends one packed command to every node through
:func:`~celery_dlock.lock.nodes.fan_out` and stops reading as soon as the
outcome is decided: enough nodes said yes, or too many said anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .fanout import fan_out
from .member import NO_REPLY, Member, Reply

__all__ = ["Quorum", "decided", "quorum_size"]


def quorum_size(nodes: int, limit: int = 1) -> int:
    """How many of ``nodes`` must grant one of ``limit`` permits: ``⌊nodes·limit/(limit+1)⌋ + 1``.

    Each node grants at most ``limit`` permits, so ``limit + 1`` holders of
    this many nodes each would need more grants than the nodes can give.
    For ``limit=1`` it is a strict majority.  The derivation is in
    ``docs/guarantees.md``.
    """
    return nodes * limit // (limit + 1) + 1


def decided(replies: Sequence[Reply], yes: Callable[[Reply], bool], quorum: int, total: int) -> bool:
    """Whether enough replies are in for the outcome to be known."""
    granted = sum(1 for r in replies if yes(r))
    failed = sum(1 for r in replies if r is not NO_REPLY and not yes(r))
    return granted >= quorum or failed > total - quorum


class Quorum:
    """Independent nodes of which enough must agree: a strict majority, or more for a semaphore.

    ``limit`` is how many holders the key admits (see :func:`quorum_size`).
    """

    def __init__(self, nodes: Sequence[Member], *, socket_timeout: float, limit: int = 1) -> None:
        self.nodes = list(nodes)
        #: How many nodes must agree.
        self.size = quorum_size(len(self.nodes), limit)
        self.socket_timeout = socket_timeout

    def broadcast(self, command: bytes, *, granted: Callable[[Reply], bool]) -> list[Reply]:
        """Send ``command`` to every node; read replies until the outcome is known."""
        total = len(self.nodes)
        return fan_out(
            [(node, command) for node in self.nodes],
            decided=lambda replies: decided(replies, granted, self.size, total),
            timeout=self.socket_timeout,
        )

    def confirm(self, command: bytes, indices: Sequence[int], *, already: int, yes: Callable[[Reply], bool]) -> bool:
        """Send ``command`` to the nodes at ``indices`` until, with ``already``, a quorum said ``yes``."""
        if already >= self.size:
            return True
        replies = fan_out(
            [(self.nodes[i], command) for i in indices],
            decided=lambda r: already + sum(1 for x in r if yes(x)) >= self.size,
            timeout=self.socket_timeout,
        )
        return already + sum(1 for r in replies if yes(r)) >= self.size

    def agreeing(self, replies: Sequence[Reply], yes: Callable[[Reply], bool]) -> bool:
        """Whether a quorum of ``replies`` say ``yes``."""
        return sum(1 for r in replies if yes(r)) >= self.size

    def read_all(self, command: bytes, nodes: Sequence[Member] | None = None) -> list[Reply]:
        """Send ``command`` to ``nodes`` (by default all) and wait for every reply (or the timeout)."""
        targets = self.nodes if nodes is None else nodes
        return fan_out([(node, command) for node in targets], decided=lambda r: False, timeout=self.socket_timeout)

    def send_all(self, command: bytes, nodes: Sequence[Member] | None = None) -> list[Reply]:
        """Send ``command`` to ``nodes`` (by default all) without waiting for replies.

        Returns, aligned with the nodes, the error of each send that failed
        and :data:`NO_REPLY` for the others.
        """
        targets = self.nodes if nodes is None else nodes
        return fan_out([(node, command) for node in targets], decided=lambda r: True, timeout=0)

    def errors(self, replies: Sequence[Reply]) -> list[tuple[str, BaseException]]:
        """``(node name, error)`` for each node whose reply is an error."""
        return [
            (node.name, reply)
            for node, reply in zip(self.nodes, replies, strict=True)
            if isinstance(reply, BaseException)
        ]
