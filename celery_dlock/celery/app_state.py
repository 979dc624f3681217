"""The plugin's state for one Celery app in one process.

:func:`locks_for` gives each app one :class:`AppLocks`: its checked settings
and its :class:`~celery_dlock.lock.redlock.Redlock`, made on first use.  Apps are
held weakly, so a test app that goes away takes its state with it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from ..lock.handoff import HandoffQueue
from ..lock.redlock import Lock, Redlock
from .history import HistoryLog
from .settings import Settings

__all__ = ["AppLocks", "locks_for"]


class AppLocks:
    """Settings, lock manager and held locks of one app in this process."""

    def __init__(self, app: Any) -> None:
        #: The app's ``dlock_*`` settings, checked.
        self.settings = Settings.from_app(app)
        #: The worker's node name, once the worker has started in this process.
        self.hostname: str | None = None
        #: Whether to send the plugin's task events: the app setting, and then
        #: the worker's own choice (``-E``) once it has started.
        self.events = bool(app.conf.worker_send_task_events)
        self._redlock: Redlock | None = None
        self._handoff_queue: HandoffQueue | None = None
        self._history: HistoryLog | None = None
        self._held: set[Lock] = set()
        self._mutex = threading.Lock()

    @property
    def redlock(self) -> Redlock:
        """The lock manager over ``dlock_redis_url``, made on first use."""
        if self._redlock is None:
            with self._mutex:
                if self._redlock is None:
                    self._redlock = Redlock(
                        list(self.settings.redis_url),
                        key_prefix=self.settings.key_prefix,
                        socket_timeout=self.settings.socket_timeout,
                        sentinel_master=self.settings.sentinel_master,
                        sentinel_kwargs=self.settings.sentinel_kwargs,
                    )
        return self._redlock

    @property
    def handoff_queue(self) -> HandoffQueue:
        """The handoff queues over the (single) lock node, made on first use."""
        if self._handoff_queue is None:
            self._handoff_queue = HandoffQueue(self.redlock)
        return self._handoff_queue

    @property
    def history(self) -> HistoryLog:
        """The key history entries this process writes (``dlock_history``), made on first use."""
        if self._history is None:
            self._history = HistoryLog(self.redlock, self.settings.history)
        return self._history

    def hold(self, lock: Lock) -> None:
        """Remember a lock held by a task body running in this process."""
        self._held.add(lock)

    def drop(self, lock: Lock) -> None:
        """Forget a lock once its body has finished."""
        self._held.discard(lock)

    def release_all(self) -> int:
        """Release every lock still held in this process; returns how many."""
        with self._mutex:
            held, self._held = self._held, set()
        return sum(1 for lock in held if lock.release())

    def flush_counts(self) -> None:
        """Write the counts and history entries this process has not written yet (:meth:`Redlock.flush_counts`)."""
        if self._redlock is not None:
            self._redlock.flush_counts()
        if self._history is not None:
            self._history.flush()


_registry: weakref.WeakKeyDictionary[Any, AppLocks] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def locks_for(app: Any) -> AppLocks:
    """The :class:`AppLocks` of ``app``, reading its settings on first call."""
    locks = _registry.get(app)
    if locks is None:
        # Built outside any except block, so a bad setting's error is the only one shown.
        with _registry_lock:
            locks = _registry.get(app)
            if locks is None:
                locks = _registry[app] = AppLocks(app)
    return locks


def known_apps() -> list[tuple[Any, AppLocks]]:
    """Every app with plugin state in this process."""
    return list(_registry.items())
