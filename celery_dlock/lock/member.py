"""What a quorum asks of each member: send, read or leave the reply, and the reply's type.

A member is one :class:`~celery_dlock.lock.nodes.Node` or a whole Redis
Cluster (:mod:`~celery_dlock.lock.cluster`); :func:`~celery_dlock.lock.fanout.fan_out`
drives either through :class:`Member`.
"""

from __future__ import annotations

import socket
from typing import Any, Final, Protocol

from redis.exceptions import RedisError

__all__ = ["NO_REPLY", "Connection", "Member", "Reply", "execute"]

#: Marks a node whose reply had not arrived when the outcome was decided.
NO_REPLY: Final = type("NoReplyType", (), {"__repr__": lambda self: "NO_REPLY"})()

#: A node's answer: the decoded RESP value, the error it raised, or NO_REPLY.
Reply = Any


class Connection(Protocol):
    """The part of a redis-py connection this module uses, typed."""

    _sock: socket.socket | None

    def connect(self) -> None:
        """Open the socket and run the handshake."""

    def disconnect(self) -> None:
        """Close the socket."""

    def send_packed_command(self, command: list[bytes], check_health: bool = ...) -> None:
        """Write already packed commands."""

    def can_read(self, timeout: float = ...) -> bool:
        """Whether a reply can be read within ``timeout`` seconds."""

    def read_response(self) -> Any:
        """Read and decode one reply."""


class Member(Protocol):
    """One member of a quorum: a :class:`Node`, or a whole Redis Cluster (:mod:`.cluster`)."""

    #: A printable name with no password.
    name: str
    #: Equal for two members that are the same server, Sentinel master or Cluster.
    identity: tuple[str, ...]

    def send(self, packed: bytes) -> None:
        """Send one packed command."""
        ...

    def fileno(self) -> int:
        """The descriptor the reply to the last command arrives on."""
        ...

    def read(self, *, block: bool = False) -> Reply:
        """The reply to the last command, or :data:`NO_REPLY` if not in yet and not ``block``."""
        ...

    def abandon(self) -> None:
        """Leave the last reply unread."""
        ...

    def execute(self, packed: bytes) -> Reply:
        """Send one command and wait for its reply."""
        ...

    def close(self) -> None:
        """Close this thread's connections."""
        ...

    def new_connection(self) -> Connection:
        """A connected connection of the caller's own, for subscriptions."""
        ...

    def scan(self, pattern: str) -> list[bytes]:
        """The names of the keys matching ``pattern`` (on a Cluster, on every master)."""
        ...

    def client(self, timeout: float) -> Any:
        """A redis-py client, for operators; the caller closes it."""
        ...


def execute(member: Member, packed: bytes) -> Reply:
    """Send one command to ``member`` and wait for its reply (returned, even if an error)."""
    try:
        member.send(packed)
    except RedisError as exc:
        return exc
    return member.read(block=True)
