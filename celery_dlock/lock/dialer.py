"""Background re-dials of a node that timed out, off the caller's path.

A hung node (SIGSTOPped, or a host whose packets are dropped) accepts a TCP
connection and then never answers, so connecting to it and loading the
scripts would cost the caller a whole socket timeout, node after node.  Once
a node has timed out, :class:`~celery_dlock.lock.nodes.Node` dials it again
only through a :class:`Dialer`: a daemon thread that connects and loads the
scripts while the calls that need the node count it as failed, which a
quorum of the others can outvote at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from .process import current_pid

__all__ = ["Dialer"]

C = TypeVar("C")


class Dialer(Generic[C]):
    """One dial running in its own thread: ``dial()``'s connection or its error, once :attr:`done`."""

    def __init__(self, dial: Callable[[], C], name: str) -> None:
        #: The process that started it: a forked child never picks up its parent's dial.
        self.pid = current_pid()
        self.connection: C | None = None
        self.error: BaseException | None = None
        self._dial = dial
        self._done = threading.Event()
        threading.Thread(target=self._run, name=f"celery-dlock-dial {name}", daemon=True).start()

    @property
    def done(self) -> bool:
        """Whether the dial has finished, one way or the other."""
        return self._done.is_set()

    def _run(self) -> None:
        try:
            self.connection = self._dial()
        except Exception as exc:  # the dial's own error, reported to the caller that picks it up
            self.error = exc
        finally:
            self._done.set()
