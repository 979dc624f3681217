"""The process id, read without a system call and renewed in a forked child.

``os.getpid()`` is a system call on every call; the lock asks for it on
every command, to notice that it runs in a child of a fork and must not use
its parent's connections.  :func:`current_pid` answers from memory.
"""

from __future__ import annotations

import os

__all__ = ["current_pid"]

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """The id of the calling process, as ``os.getpid()`` would return it."""
    return _pid
