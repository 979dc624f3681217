"""Argument checks shared by every layer, each naming the parameter it refuses.

They raise :class:`TypeError` for a value of the wrong type and
:class:`ValueError` for one out of range, with the parameter's name first in
the message; the Celery layer turns both into a
:class:`~celery_dlock.lock.errors.ConfigurationError` naming the setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_TTL",
    "MIN_TTL",
    "check_acquire",
    "check_acquire_options",
    "check_choice",
    "check_int",
    "check_key",
    "check_manager_options",
    "check_number",
    "check_owner_prefix",
    "check_text",
    "check_ttl",
]

#: Redis counts leases in whole milliseconds.
MIN_TTL: Final = 0.001

#: The longest lease Redis can set: PEXPIRE refuses an expiry past 2**63 ms
#: from the epoch, so leases stay well inside that (about 146,000 years).
MAX_TTL: Final = 2**62 / 1000

#: The longest lock key, in UTF-8 bytes.  Longer ones are refused rather
#: than stored: a key is sent with every command on the hot path.
MAX_KEY_BYTES: Final = 8192


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    exclusive: bool = False,
    below: float | None = None,
) -> float:
    """A finite int or float (never a bool) within the bounds; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise ValueError(f"{name}: must be {bound}, got {value!r}")
    if below is not None and value >= below:
        raise ValueError(f"{name}: must be < {below}, got {value!r}")
    return float(value)


def check_int(name: str, value: object, *, minimum: int) -> int:
    """A whole number (never a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    return value


def check_text(name: str, value: object) -> str:
    """A str that Redis can be sent: encodable as UTF-8 (it may be empty)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name}: not encodable as UTF-8: {exc}") from None
    return value


def check_owner_prefix(value: object, *, required: bool = False) -> str:
    """An owner prefix: a str without a newline, since a lock stores its owner as its first line.

    ``required`` refuses the empty prefix, which would match every owner.
    """
    text = check_text("owner_prefix", value)
    if required and not text:
        raise ValueError("owner_prefix: must be a non-empty str")
    if "\n" in text:
        raise ValueError("owner_prefix: must not contain a newline (a lock stores its owner on one line)")
    return text


def check_key(key: object) -> str:
    """A lock key: a non-empty str encodable as UTF-8, of at most :data:`MAX_KEY_BYTES`."""
    text = check_text("key", key)
    if not text:
        raise ValueError("key: must not be empty")
    if len(text) * 4 > MAX_KEY_BYTES and len(text.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"key: {len(text.encode())} bytes long; at most {MAX_KEY_BYTES} are allowed")
    return text


def check_ttl(ttl: object, name: str = "ttl") -> float:
    """A lease in seconds: a finite number from a millisecond to :data:`MAX_TTL`."""
    seconds = check_number(name, ttl, minimum=MIN_TTL)
    if seconds > MAX_TTL:
        raise ValueError(f"{name}: at most {MAX_TTL:g} seconds, the longest lease Redis can set; got {ttl!r}")
    return seconds


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def check_acquire_options(*, timeout: object, max_hold: object, on_lost: object, label: object) -> None:
    """Check an acquire's optional arguments, naming the one that is wrong."""
    if timeout is not None:
        check_number("timeout", timeout, minimum=0)
        if timeout > MAX_TTL:  # type: ignore[operator]  # check_number proved it a number
            raise ValueError(f"timeout: at most {MAX_TTL:g} seconds; got {timeout!r}")
    if max_hold is not None:
        check_number("max_hold", max_hold, minimum=0, exclusive=True)
    if on_lost is not None and not callable(on_lost):
        raise TypeError("on_lost: expected a callable")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label: expected str, got {type(label).__name__}")


def check_manager_options(
    *,
    retry_count: object,
    retry_delay: object,
    retry_jitter: object,
    drift_factor: object,
    socket_timeout: object,
    extend_every: object,
    key_prefix: object,
) -> None:
    """Check the options a lock manager (sync or async) is made with, naming the one that is wrong."""
    check_int("retry_count", retry_count, minimum=0)
    check_number("retry_delay", retry_delay, minimum=0)
    check_number("retry_jitter", retry_jitter, minimum=0)
    check_number("drift_factor", drift_factor, minimum=0, below=1)
    check_number("socket_timeout", socket_timeout, minimum=0, exclusive=True)
    check_number("extend_every", extend_every, minimum=0, exclusive=True, below=1)
    check_text("key_prefix", key_prefix)


def check_acquire(
    key: object,
    ttl: object,
    timeout: object,
    max_hold: object,
    on_lost: object,
    label: object,
    owner_prefix: object,
    limit: object,
) -> float:
    """Check an acquire's arguments (sync or async), naming the one that is wrong; returns the ttl as a float."""
    check_key(key)
    seconds = check_ttl(ttl)
    check_acquire_options(timeout=timeout, max_hold=max_hold, on_lost=on_lost, label=label)
    check_owner_prefix(owner_prefix)
    check_int("limit", limit, minimum=1)
    return seconds
