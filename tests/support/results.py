"""Collecting a test's ``AsyncResult`` objects while their result backend is still up."""

from __future__ import annotations

import gc
import warnings


def collect_results() -> None:
    """Run the garbage collector, so results held in reference cycles die now.

    ``AsyncResult.__del__`` unsubscribes from the Redis result backend.  A
    result left to a later collection runs that after its server has been
    stopped, where the backend retries for a minute and then raises into
    whichever test the collector happened to interrupt.  Celery's own broker
    sockets collected here raise ``ResourceWarning``: Celery's, not ours.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
