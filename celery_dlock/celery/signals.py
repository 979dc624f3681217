"""Celery signal hooks: release on the paths where the body's ``finally`` cannot.

A body's own ``try``/``finally`` releases its lock on success, failure,
``retry()``, ``Ignore``, ``Reject``, soft time limits and
``revoke(terminate=True)`` with SIGTERM (which the pool process turns into an
exception).  When the pool process dies instead (a hard time limit,
``revoke(terminate=True, signal="SIGKILL")``, a ``WorkerLostError``), nothing
runs in it; the worker's main process then frees the dead run's lock by its
owner prefix (task id and worker name), which only that run can have.  If even the main process dies, the
lease ends within one ttl, since no watchdog renews it any more.

The hooks are connected once per process, when the first single-flight task
is defined, never at import time.  At ``worker_init`` a bootstep is added
that checks every single-flight task's settings, so a bad value stops the
worker at start-up with an error naming the setting.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Final

from billiard.exceptions import WorkerLostError
from celery import bootsteps, signals
from celery.exceptions import TimeLimitExceeded

from ..lock.errors import ConfigurationError
from .app_state import known_apps, locks_for
from .checks import task_problems
from .guard import guard_of
from .handoffs import hand_on_stranded
from .publish import install as install_publish_check
from .reaper import OfflineReaper
from .settings import broker_visibility_timeout, unknown_settings

__all__ = ["SettingsCheck", "check_worker", "connect_signals"]

logger = logging.getLogger(__name__)

#: The one signal after which a terminated body cannot still be running its
#: ``finally``: billiard turns SIGTERM and SIGQUIT into exceptions in the pool
#: process, which release the lock themselves once the body has unwound.
_FATAL_SIGNALS: Final = frozenset({signal.SIGKILL})

_connected = False
_connect_lock = threading.Lock()


def connect_signals() -> None:
    """Connect the hooks, and wrap ``send_task`` with the publish-time check, once per process."""
    global _connected
    with _connect_lock:
        if _connected:
            return
        signals.worker_init.connect(_on_worker_init, weak=False)
        signals.task_failure.connect(_on_task_failure, weak=False)
        signals.task_revoked.connect(_on_task_revoked, weak=False)
        signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)
        signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
        install_publish_check()
        _connected = True


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Signal receivers cannot stop a worker (their errors are only logged), but
    # a bootstep that raises does: the check runs as one, before the pool starts.
    sender.app.steps["worker"].add(SettingsCheck)
    # Enabled only with dlock_reclaim_offline (it reads the setting itself).
    sender.app.steps["consumer"].add(OfflineReaper)


class SettingsCheck(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: refuse to start on a bad ``dlock_*`` setting.

    When a task parks messages in handoff queues, it also sweeps them on a
    timer in the main process, handing on the queues of holders that died.
    """

    name = "celery_dlock.settings-check"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.queues = check_worker(worker)

    def start(self, worker: Any) -> None:
        """Start the handoff sweep on the worker's timer, if any task parks messages."""
        if self.queues:
            interval = locks_for(worker.app).settings.sweep_interval
            worker.timer.call_repeatedly(interval, _sweep, (worker.app,))


def _sweep(app: Any) -> None:
    try:
        handoffs = hand_on_stranded(app)
    except Exception:  # the timer must keep running
        logger.warning("handoff sweep failed", exc_info=True)
        return
    if handoffs:
        logger.info("handed on %d parked message(s) whose holder had gone", len(handoffs))


def check_worker(worker: Any) -> bool:
    """Check the settings of every single-flight task of the worker's app.

    Raises :class:`~celery_dlock.lock.errors.ConfigurationError` naming the
    setting or task at fault.  Returns whether any task uses a handoff queue.
    """
    app = worker.app
    for key, meant in unknown_settings(app.conf):
        hint = f"; did you mean {meant}?" if meant else ""
        logger.warning("celery_dlock: %s is not a dlock setting and is ignored%s", key, hint)
    locks = locks_for(app)  # reads and checks the dlock_* settings
    locks.hostname = worker.hostname
    locks.events = bool(worker.task_events)
    visibility = broker_visibility_timeout(app.conf)
    queues = False
    for task in list(app.tasks.values()):
        guard = guard_of(task)
        if guard is None:
            continue
        policy = guard.policy(locks)
        queues = queues or policy.queues
        for problem in task_problems(policy, locks.settings, visibility):
            if problem.fatal:
                raise ConfigurationError(f"task {task.name!r}: {problem.text}")
    return queues


def _on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: Any = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    # These two are reported by the main process after the pool process died.
    if not isinstance(exception, (WorkerLostError, TimeLimitExceeded)) or task_id is None:
        return
    guard = guard_of(sender)
    if guard is None:
        return
    hostname = getattr(sender.request, "hostname", None) or locks_for(sender.app).hostname
    if guard.release_dead_run(sender, task_id, hostname, args or (), kwargs or {}):
        logger.info("released the lock of %s[%s] after %r", sender.name, task_id, exception)


def _on_task_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, signum: Any = None, **_: Any
) -> None:
    guard = guard_of(sender)
    if guard is None or request is None:
        return
    if not terminated:
        # Revoked or expired before it started: its queue lock, if any, goes now.
        if guard.release_queued(sender, request.id, request.args or (), request.kwargs or {}):
            logger.info("freed the queue lock of revoked %s[%s]", sender.name, request.id)
        return
    if signum not in _FATAL_SIGNALS:
        return
    hostname = request.hostname or locks_for(sender.app).hostname
    if guard.release_dead_run(sender, request.id, hostname, request.args or (), request.kwargs or {}):
        logger.info("released the lock of terminated %s[%s]", sender.name, request.id)


def _on_worker_process_shutdown(**_: Any) -> None:
    for _app, locks in known_apps():
        released = locks.release_all()
        if released:
            logger.info("released %d lock(s) held by an exiting pool process", released)
        locks.flush_counts()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    from celery.worker import state  # noqa: PLC0415 - the worker's own module, only in a worker

    for request in list(state.active_requests):
        task = request.task
        guard = guard_of(task)
        if guard is not None:
            guard.release_dead_run(task, request.id, request.hostname, request.args, request.kwargs)
    for _app, locks in known_apps():
        locks.flush_counts()
