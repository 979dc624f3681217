"""Optional libraries: the anchors the benchmarks compare against.

Each is in the ``bench`` extra; a run without one skips its variants and
says so in the report's notes rather than failing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["optional_import", "skipped_note"]


def optional_import(module: str, notes: list[str], *, package: str | None = None) -> Any:
    """Import ``module``, or return ``None`` and add a note that it was skipped."""
    try:
        return importlib.import_module(module)
    except ImportError:
        notes.append(skipped_note(package or module))
        return None


def skipped_note(package: str) -> str:
    """The note for variants skipped because ``package`` is not installed."""
    return (
        f"{package} is not installed, so its variants were skipped "
        "(install the bench extra: `pip install -e .[bench]`)."
    )
