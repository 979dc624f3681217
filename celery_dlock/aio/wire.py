"""One pipelined RESP2 connection on an event loop: commands written at once, replies matched in order.

A :class:`Wire` is an :class:`asyncio.Protocol`.  :meth:`Wire.request` writes
a packed command synchronously and returns the future of its reply; replies
are parsed as they arrive and resolve those futures strictly in the order the
commands were written, whether anyone still awaits them or not.  So a
caller that stops waiting (a quorum is in, or it was cancelled) never
shifts a later command's reply, and a command written later (the undo of a
cancelled attempt) always runs after the earlier ones.  A reply that says
the scripts are gone (``SCRIPT FLUSH``) has its command sent again once,
after the scripts are loaded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from ..lock.member import Reply

__all__ = ["Wire", "parse_reply"]

logger = logging.getLogger(__name__)

#: A parse that needs more bytes.
INCOMPLETE: Final = object()

_CRLF: Final = b"\r\n"


def parse_reply(buffer: bytes | bytearray, start: int = 0) -> tuple[Any, int]:
    """The RESP2 value at ``start`` and the offset after it, or ``(INCOMPLETE, start)``.

    Errors are returned as :class:`~redis.exceptions.ResponseError` (a
    ``NOSCRIPT`` one as :class:`~redis.exceptions.NoScriptError`).
    """
    end = buffer.find(_CRLF, start)
    if end < 0:
        return INCOMPLETE, start
    kind, line, after = bytes(buffer[start : start + 1]), bytes(buffer[start + 1 : end]), end + 2
    if kind == b"$":
        value, after = _bulk(buffer, int(line), after)
    elif kind == b"*":
        value, after = _array(buffer, int(line), after)
    elif kind in _SCALARS:
        value = _SCALARS[kind](line)
    else:
        raise RedisConnectionError(f"unexpected RESP reply type {kind!r}")
    return (INCOMPLETE, start) if value is INCOMPLETE else (value, after)


def _error(line: bytes) -> ResponseError:
    text = line.decode(errors="replace")
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


_SCALARS: Final[dict[bytes, Callable[[bytes], Any]]] = {b"+": bytes, b":": int, b"-": _error}


def _bulk(buffer: bytes | bytearray, size: int, after: int) -> tuple[Any, int]:
    if size < 0:
        return None, after
    if len(buffer) < after + size + 2:
        return INCOMPLETE, after
    return bytes(buffer[after : after + size]), after + size + 2


def _array(buffer: bytes | bytearray, count: int, after: int) -> tuple[Any, int]:
    if count < 0:
        return None, after
    items = []
    for _ in range(count):
        item, after = parse_reply(buffer, after)
        if item is INCOMPLETE:
            return INCOMPLETE, after
        items.append(item)
    return items, after


class Wire(asyncio.Protocol):
    """A connection's commands in flight, and the replies they are owed.

    ``reload`` is the packed ``SCRIPT LOAD`` of the preloaded scripts and
    ``scripts`` their number, for a command answered ``NOSCRIPT``.
    """

    def __init__(self, name: str, reload: bytes = b"", scripts: int = 0) -> None:
        self.name = name
        self._reload = reload
        self._scripts = scripts
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        #: Per command written, in order: the command and its reply's future (``None`` for a reply to skip).
        self._owed: collections.deque[tuple[bytes, asyncio.Future[Reply] | None]] = collections.deque()
        self._resent: set[asyncio.Future[Reply]] = set()
        self._gone: asyncio.Future[None] | None = None
        #: Whether the connection is closed, or closing: nothing more may be written.
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write to."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def request(self, packed: bytes, reply: asyncio.Future[Reply] | None) -> None:
        """Write ``packed`` now; its reply resolves ``reply`` (or is skipped if ``None``)."""
        assert self._transport is not None
        self._transport.write(packed)
        self._owed.append((packed, reply))

    def skip(self, packed: bytes, replies: int) -> None:
        """Write ``packed``, whose ``replies`` replies nobody needs (a handshake, the script loads)."""
        assert self._transport is not None
        self._transport.write(packed)
        self._owed.extend((b"", None) for _ in range(replies))

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply and hand it to the command it answers."""
        buffer = self._buffer
        buffer += data
        offset = 0
        while offset < len(buffer) and self._owed:
            value, offset_after = parse_reply(buffer, offset)
            if value is INCOMPLETE:
                break
            offset = offset_after
            packed, reply = self._owed.popleft()
            if reply is None or reply.done():
                continue
            if isinstance(value, NoScriptError) and reply not in self._resent:
                self._resent.add(reply)  # someone ran SCRIPT FLUSH since we connected: load, send again once
                self.skip(self._reload, self._scripts)
                self.request(packed, reply)
                continue
            self._resent.discard(reply)
            reply.set_result(value)
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every reply still owed."""
        self.closed = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        error = RedisConnectionError(f"connection to {self.name} lost" + (f": {exc}" if exc else ""))
        while self._owed:
            _, reply = self._owed.popleft()
            if reply is not None and not reply.done():
                reply.set_result(error)

    def abort(self) -> None:
        """Drop the connection at once: its replies can no longer be matched (a command timed out)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Close the connection once what was written is sent, and wait until it is closed."""
        self.closed = True
        if self._transport is not None and not self._transport.is_closing():
            self._gone = asyncio.get_running_loop().create_future()
            self._transport.close()
            await self._gone
