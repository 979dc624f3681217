"""``SingleFlightTask``: the base class, and the app-wide ``task_cls``.

A task made from this class is single-flight when it has ``single_flight``
options, given to ``@app.task(single_flight={...})`` or set on a subclass;
without them it runs exactly as a plain task and makes no Redis call, so the
class is safe as ``Celery(..., task_cls="celery_dlock:SingleFlightTask")``::

    @app.task(base=SingleFlightTask, single_flight={"key": "report:{day}"})
    def build_report(day): ...

    class SyncAccount(SingleFlightTask):
        single_flight = {"key": "sync:{account_id}", "on_busy": "skip"}

        def run(self, account_id): ...
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from celery import Task

from ..lock.errors import DLockError
from ..lock.lease import Lock
from .guard import SingleFlight, current_lock, guard_of, guarded_by
from .options import SingleFlightOptions
from .signals import connect_signals

__all__ = ["SingleFlightTask"]


class SingleFlightTask(Task):  # type: ignore[misc]
    """A Celery task that holds a Redlock lock while its body runs."""

    #: The single-flight options: a dict of :class:`SingleFlightOptions`
    #: fields, an options object, ``True`` for the defaults, or ``None`` for a
    #: plain task.
    single_flight: ClassVar[Any] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.single_flight is None:
            return
        if "single_flight" not in cls.__dict__ and "run" not in cls.__dict__:
            return  # inherits an already guarded run
        raw = inspect.getattr_static(cls, "run")
        inherited = guard_of(_unwrap(raw)) if _unwrap(raw) in _class_guarded else None
        if inherited is not None:
            # A subclass with options of its own: guard the original body again.
            function, bound = inherited.function, bool(inherited.bound)
        elif guard_of(_unwrap(raw)) is not None:
            raise TypeError(f"task {cls.__name__}: both @single_flight and single_flight= are given; use one")
        else:
            function, bound = _unwrap(raw), not isinstance(raw, staticmethod)
        options = SingleFlightOptions.coerce(cls.single_flight, task_name=cls.__name__)
        cls.single_flight = options
        cls.run = _guarded_method(SingleFlight(options, function, bound=bound), function, bound)
        connect_signals()

    @property
    def dlock(self) -> Lock | None:
        """The lock held by the running body: key, token, ``remaining()``, ``lost``."""
        return current_lock()

    def on_lock_lost(self, lock: Lock, error: DLockError) -> None:
        """Handler called when the lock is lost while the body still runs.

        Called from the watchdog thread, not the body's, after the plugin has
        logged a warning and sent a ``task-lock-lost`` event.  The default does
        nothing more; ``self.dlock.lost`` is already true, and
        ``self.dlock.ensure_held()`` raises :class:`~celery_dlock.LockLost`
        before a write.  Override it to stop work early.

        Arguments:
            lock: The lock that was lost.
            error: Why: :class:`~celery_dlock.LockLost` when another owner has
                it or the lease ran out, :class:`~celery_dlock.LockUnavailable`
                when the nodes could not be reached before it ran out.

        The return value is ignored.

        """


#: The ``run`` methods made here, as opposed to functions guarded by ``@single_flight``.
_class_guarded: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _unwrap(run: Any) -> Any:
    return run.__func__ if isinstance(run, staticmethod) else run


def _guarded_method(guard: SingleFlight, function: Any, bound: bool) -> Any:
    """A ``run`` method that calls ``function`` under ``guard``."""

    @functools.wraps(function)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if bound:
            return guard.run(self, lambda: function(self, *args, **kwargs), args, kwargs)
        return guard.run(self, lambda: function(*args, **kwargs), args, kwargs)

    if not bound:
        # Seen through the instance, ``run`` must show the function's own
        # parameters, which Celery reads to re-bind arguments on retry.
        signature = inspect.signature(function)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *signature.parameters.values()]
        )
    guarded_by(run, guard)
    _class_guarded.add(run)
    return run
