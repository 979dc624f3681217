"""Plain-text tables, durations and times, as every ``celery dlock`` command prints them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["duration", "table", "timestamp"]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, without trailing blanks."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [headers, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def duration(seconds: float | None) -> str:
    """``12.3s``, ``4m05s`` or ``2h07m``; ``-`` for ``None``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def timestamp(value: Any, *, precise: bool = False) -> str:
    """A Unix time as ``YYYY-mm-dd HH:MM:SS UTC`` (with milliseconds if ``precise``); ``-`` if not a number."""
    if not isinstance(value, (int, float)):
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))
    if precise:
        text += f".{int(value * 1000) % 1000:03d}"
    return text + " UTC"
