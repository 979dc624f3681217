"""The Celery integration: single-flight tasks over the lock core.

``@single_flight``, :class:`SingleFlightTask` and the signal hooks that
release on every path.  It imports the lock core and Celery, never
:mod:`celery_dlock.beat` or :mod:`celery_dlock.ops`.
"""

from __future__ import annotations

# First: compat refuses a Celery older than its floor before anything else loads.
from . import compat  # noqa: F401  # isort: skip
from .decorators import single_flight
from .guard import current_lock
from .options import SingleFlightOptions
from .task import SingleFlightTask

__all__ = ["SingleFlightOptions", "SingleFlightTask", "current_lock", "single_flight"]
