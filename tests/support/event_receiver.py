"""A real Celery event receiver, in a thread of the test, for the tests of the events the plugin sends."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from celery import Celery

__all__ = ["receiving"]


@contextlib.contextmanager
def receiving(app: Celery, name: str = "event-receiver") -> Iterator[list[dict[str, Any]]]:
    """Every event sent on ``app``'s broker from now on until the block ends, as a receiver gets them.

    Entered once the receiver consumes, so that no event sent in the block is missed.
    """
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    class Receiver(app.events.Receiver):  # type: ignore[name-defined,misc]
        def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
            super().on_consume_ready(*args, **kwargs)
            ready.set()

    connection = app.connection_for_read()
    receiver = Receiver(connection, handlers={"*": seen.append})

    def receive() -> None:
        with contextlib.suppress(OSError):
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.2):
                pass

    thread = threading.Thread(target=receive, name=name, daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the event receiver did not start consuming"
        yield seen
    finally:
        receiver.should_stop = True
        thread.join(5)
        connection.release()
