"""RESP encoding of commands, so a command is packed once and sent to every node."""

from __future__ import annotations

__all__ = ["pack"]


def pack(*args: str | bytes | int) -> bytes:
    """Encode one command in RESP, ready to send to any node."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if type(arg) is bytes else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)
