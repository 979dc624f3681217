"""RESP encoding of commands, so a command is packed once and sent to every node."""

from __future__ import annotations

__all__ = ["first_key", "pack"]

#: Commands whose keys follow a key count (``EVALSHA sha numkeys key...``).
_SCRIPT_COMMANDS = frozenset({b"EVAL", b"EVALSHA"})


def pack(*args: str | bytes | int) -> bytes:
    """Encode one command in RESP, ready to send to any node."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if type(arg) is bytes else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def first_key(packed: bytes) -> bytes | None:
    """The first key of the first command in ``packed`` (as :func:`pack` made it), if it names one.

    For a script call that is its first key; for any other command, its
    first argument.  A Redis Cluster node routes the command by it.
    """
    args = _bulk_strings(packed, 4)
    if not args:
        return None
    if args[0].upper() in _SCRIPT_COMMANDS:
        return args[3] if len(args) > 3 and args[2] != b"0" else None
    return args[1] if len(args) > 1 else None


def _bulk_strings(packed: bytes, limit: int) -> list[bytes]:
    """The first ``limit`` arguments of the first command in ``packed``."""
    end = packed.index(b"\r\n")
    count = min(int(packed[1:end]), limit)
    args = []
    at = end + 2
    for _ in range(count):
        end = packed.index(b"\r\n", at)
        length = int(packed[at + 1 : end])
        args.append(packed[end + 2 : end + 2 + length])
        at = end + 4 + length
    return args
