"""What the plugin tells monitors: task events, counters, and lost-lock reports.

``task-lock-acquired``, ``task-requeued``, ``task-skipped``, ``task-parked``,
``task-coalesced``, ``task-deduped`` and ``task-lock-lost`` reach Flower and ``celery events``
like Celery's own task events, and are sent only when those are
(``worker_send_task_events``, or ``celery worker -E``).  ``task-duplicate``
and ``task-replaced`` are sent by the publisher, where a publish met a
publish-time lock, when it sends ``task-sent`` events
(``task_send_sent_event``) or task events at all.

Flower keeps only the fields it knows of a task event (those of
``celery.events.state.Task``), so what it must show goes in one of them:
``task-coalesced`` carries the serving run's id in ``result`` as well as in
``into``.  A run that ends without its body running, with a state stored in
the result backend (a skip's FAILURE, a coalesce's SUCCESS), is followed by
the ``task-failed`` or ``task-succeeded`` event Celery would have sent, so
that Flower's final state is the backend's (:func:`store_outcome`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, Task, states
from celery.app.task import Context
from celery.utils.log import get_task_logger
from celery.utils.saferepr import saferepr

from ..lock.errors import DLockError
from ..lock.lease import Lock
from .app_state import AppLocks, locks_for
from .headers import first_delivery
from .timings import observe

__all__ = [
    "LossReporter",
    "RunWatch",
    "Throttle",
    "describe",
    "log_prefix",
    "report",
    "send_task_event",
    "store_outcome",
]

logger = logging.getLogger(__name__)
task_logger = get_task_logger(__name__)


def send_task_event(
    app: Celery, type_: str, *, uuid: str | None, hostname: str | None, publisher: bool = False, **fields: Any
) -> None:
    """Send one task event for ``uuid`` if the worker sends task events.

    With ``publisher=True`` the event is sent also where the app sends
    ``task-sent`` events (``task_send_sent_event``).
    """
    enabled = locks_for(app).events or (publisher and bool(app.conf.task_send_sent_event))
    if uuid is None or not enabled:
        return
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(type_, uuid=uuid, **fields)
    except Exception:  # monitoring must never break a task
        logger.warning("could not send %s event for %s", type_, uuid, exc_info=True)


def report(app: Celery, task: Task, request: Context, what: str, **fields: Any) -> None:
    """Count ``what`` happening to a run and send its ``task-<what>`` event."""
    locks_for(app).redlock.count(task.name, what)
    send_task_event(app, f"task-{what}", uuid=request.id, hostname=request.hostname, **fields)


def store_outcome(app: Celery, task: Task, request: Context, state: str, value: Any) -> None:
    """Store ``value`` as the result of a run that ends unrun, and tell monitors as Celery would.

    ``state`` is ``FAILURE`` (``value`` an exception) or ``SUCCESS``.  Nothing
    is stored or sent when the run's result is ignored.
    """
    if request.ignore_result or task.ignore_result:
        return
    task.backend.store_result(request.id, value, state, request=request)
    uuid, hostname = request.id, request.hostname
    if state == states.FAILURE:
        send_task_event(app, "task-failed", uuid=uuid, hostname=hostname, exception=saferepr(value), traceback=None)
    else:
        send_task_event(app, "task-succeeded", uuid=uuid, hostname=hostname, result=saferepr(value), runtime=None)


def log_prefix(task: Task | None, task_id: str | None) -> dict[str, str]:
    """The ``extra=`` that gives a task log line logged outside the run its ``name[id]`` prefix.

    Celery's task log format starts with ``%(task_name)s[%(task_id)s]``, read
    from the task running in the logging thread, or ``???`` where there is
    none, as in the watchdog's thread; fields given in ``extra`` come first.
    """
    return {"task_name": getattr(task, "name", None) or "<direct call>", "task_id": task_id or "-"}


def describe(task: Task | None, task_id: str | None) -> str:
    """``name[id]`` of a run, for log lines."""
    name = getattr(task, "name", None) or "<direct call>"
    return f"{name}[{task_id}]" if task_id else name


class LossReporter:
    """The ``on_lost`` callback of a running task's lock, called by the watchdog."""

    def __init__(self, task: Task | None, app: Celery, task_id: str | None, hostname: str | None) -> None:
        self.task, self.app, self.task_id, self.hostname = task, app, task_id, hostname

    def __call__(self, lock: Lock, error: DLockError) -> None:
        """Log, count and announce the loss, then call the task's ``on_lock_lost``."""
        task_logger.warning(
            "lock %r of %s lost mid-body: %s",
            lock.key,
            describe(self.task, self.task_id),
            error,
            extra=log_prefix(self.task, self.task_id),
        )
        locks = locks_for(self.app)
        if lock.count_as:
            locks.redlock.count(lock.count_as, "lost")
        facts: dict[str, Any] = {"token": lock.token, "reason": str(error)}
        locks.history.record(lock.key, "lost", task=lock.count_as, task_id=self.task_id, worker=self.hostname, **facts)
        send_task_event(self.app, "task-lock-lost", uuid=self.task_id, hostname=self.hostname, key=lock.key, **facts)
        hook = getattr(self.task, "on_lock_lost", None)
        if hook is not None:
            hook(lock, error)


class RunWatch:
    """What one locked run adds to the metrics and to its key's history, besides its events.

    Made as the run starts, which is when a first delivery is stamped on the
    message (:func:`~celery_dlock.celery.headers.first_delivery`); told of the
    grant and of the body's end.  With ``dlock_metrics`` and ``dlock_history``
    both off, it does nothing.
    """

    def __init__(self, locks: AppLocks, task: str, request: Context | None) -> None:
        self.locks = locks
        self.task = task
        self.task_id: str | None = getattr(request, "id", None)
        self.worker: str | None = getattr(request, "hostname", None)
        settings = locks.settings
        #: The counters the observations go to, or ``None`` without ``dlock_metrics``.
        self.tally = locks.redlock.tally if settings.metrics else None
        self.history = settings.history > 0
        #: When the run's message was first delivered (Unix time); 0 without metrics.
        self.arrived = first_delivery(request) if self.tally is not None else 0.0

    def granted(self, lock: Lock) -> None:
        """The run holds ``lock``: observe its wait, and record the grant."""
        if self.tally is not None:
            observe(self.tally, self.task, "wait_seconds", time.time() - self.arrived)
        if self.history:
            self._record(lock, "granted")

    def ended(self, lock: Lock, *, kept: bool) -> None:
        """The body ended and ``lock`` is about to be released, or ``kept`` (``hold``)."""
        if self.tally is None and not self.history:
            return
        held = time.monotonic() - lock.acquired_at
        if self.tally is not None:
            observe(self.tally, self.task, "hold_seconds", held)
        if self.history and not lock.lost:  # a loss was recorded when it was seen
            self._record(lock, "kept" if kept else "released", held=f"{held:.3f}")

    def _record(self, lock: Lock, event: str, **fields: str) -> None:
        self.locks.history.record(
            lock.key, event, task=self.task, task_id=self.task_id, worker=self.worker, token=lock.token, **fields
        )


class Throttle:
    """Lets one log line through per ``interval`` seconds and counts the rest.

    For a condition that repeats on every task while it lasts, such as the
    lock service being down, so that a storm of tasks does not flood the log.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0
        self._mutex = threading.Lock()

    def ready(self) -> int | None:
        """``None`` to stay quiet; else how many lines were held back since the last one."""
        now = time.monotonic()
        with self._mutex:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval
            held, self._suppressed = self._suppressed, 0
            return held
