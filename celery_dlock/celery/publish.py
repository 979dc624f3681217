"""Publish-time locks: the duplicate check of every publish of a scoped task.

A task with ``scope="queue"``, ``"queue+run"`` or ``"life"`` takes its queue
lock (:mod:`celery_dlock.celery.scopes`) when it is published, in
``Celery.send_task``, which ``apply_async``, ``delay``, ``retry()``,
signatures and ``app.send_task`` by name all go through.  :func:`install`
wraps that one method, once per process; a publish of any other task, or of
a task this process has not registered, passes straight through.

When the queue lock is held (or, for ``"life"``, the run lock), the publish
is a duplicate and ``on_duplicate`` decides what the caller gets:

* ``"return"``: the holder's ``AsyncResult``;
* ``"raise"``: :class:`~celery_dlock.lock.errors.AlreadyQueued`, naming the holder's task id;
* ``"replace"``: the waiting holder is revoked, its queue lock freed, and
  this message published; a holder that already runs is kept and ``"return"`` applies;
* ``"drop"``: ``None``, logged at INFO.

Never duplicates: the copies the plugin publishes itself (requeues and
handoffs, which carry its headers), and a task's own ``retry()`` (the same
task id, published from inside its run), which takes the queue lock if it is
free and is published anyway if it is not.  A new message published from
inside a ``"life"`` run of the same key does not collide with the run
lock of the run publishing it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from celery import Celery, Task
from kombu.utils.uuid import uuid

from ..lock.errors import AlreadyQueued, LockBusy, LockUnavailable
from ..lock.lease import Lock
from .app_state import AppLocks, locks_for
from .compat import registered_task, running_task
from .events import send_task_event
from .guard import SingleFlight, guard_of
from .headers import REQUEUES_HEADER, TICKET_HEADER
from .options import Policy
from .scopes import QUEUE_LOCK_KIND, free_queue_lock, holder_id, queue_key, queue_lease, queue_owner

__all__ = ["install"]

logger = logging.getLogger(__name__)

#: How often a publish retries after replacing a holder that another publish replaced first.
_REPLACE_ATTEMPTS: Final = 3

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Wrap ``Celery.send_task`` with the duplicate check, once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return
        original = Celery.send_task

        @functools.wraps(original)
        def send_task(
            app: Celery,
            name: str,
            args: Sequence[Any] | None = None,
            kwargs: Mapping[str, Any] | None = None,
            countdown: float | None = None,
            eta: Any = None,
            task_id: str | None = None,
            *rest: Any,
            **options: Any,
        ) -> Any:
            def send(new_id: str | None) -> Any:
                return original(app, name, args, kwargs, countdown, eta, new_id, *rest, **options)

            task = options.get("task_type") or registered_task(app, name)
            guard = guard_of(task) if task is not None else None
            if guard is None or not _scoped(app, guard) or _plugin_copy(options):
                return send(task_id)
            publish = Publish(app, task, guard, args or (), kwargs or {}, task_id or uuid())
            lease = queue_lease(publish.policy.queue_ttl, countdown=countdown, eta=eta, expires=options.get("expires"))
            return publish.run(send, lease, options.get("result_cls") or app.AsyncResult)

        Celery.send_task = send_task
        _installed = True


def _scoped(app: Celery, guard: SingleFlight) -> bool:
    """Whether the task takes a publish-time lock, without reading the settings when it says so itself."""
    scope = guard.options.scope or app.conf.get("dlock_scope") or app.conf.get("DLOCK_SCOPE") or "run"
    return scope != "run"


def _plugin_copy(options: Mapping[str, Any]) -> bool:
    """Whether the message is a requeued or handed-off copy the plugin publishes itself."""
    headers = options.get("headers") or {}
    return REQUEUES_HEADER in headers or TICKET_HEADER in headers


class Publish:
    """One publish of a scoped task: take its queue lock, or settle the duplicate."""

    def __init__(
        self,
        app: Celery,
        task: Task,
        guard: SingleFlight,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        task_id: str,
    ) -> None:
        self.app, self.task, self.task_id = app, task, task_id
        self.locks: AppLocks = locks_for(app)
        self.policy: Policy = guard.policy(self.locks)
        self.key = guard.key_for(task, args, kwargs)
        self.run_key = guard.run_key(self.key, self.policy, time.time())
        running = running_task()
        #: The id of the run of this same task that publishes, if any: its run lock is no duplicate.
        self.publisher = running.request.id if running is not None and guard_of(running) is guard else None

    def run(self, send: Callable[[str | None], Any], lease: float, result_cls: Callable[[str], Any]) -> Any:
        """Publish through ``send`` holding the queue lock, or return what a duplicate gets."""
        for _ in range(_REPLACE_ATTEMPTS):
            try:
                claim = self._claim(lease)
            except LockBusy as busy:
                if self.publisher == self.task_id:
                    logger.info("retry of %s[%s] published beside a queued copy", self.task.name, self.task_id)
                    return send(self.task_id)
                if self._replaced(busy):
                    continue
                return self._duplicate(busy, result_cls)
            except LockUnavailable as down:
                if self.policy.fail_mode != "open":
                    raise
                logger.warning("publishing %s[%s] without its queue lock: %s", self.task.name, self.task_id, down)
                return send(self.task_id)
            try:
                result = send(self.task_id)
            except BaseException:
                claim.release()
                raise
            self.locks.redlock.count(self.task.name, "queued")
            return result
        raise LockBusy.for_key(queue_key(self.key), attempts=_REPLACE_ATTEMPTS, detail="replaced again and again")

    def _claim(self, lease: float) -> Lock:
        """Take the queue lock; for ``"life"``, also find the run lock free (or held by the publisher)."""
        redlock = self.locks.redlock
        claim = redlock.acquire(
            queue_key(self.key),
            lease,
            blocking=False,
            label=self.task_id,
            owner_prefix=queue_owner(self.task_id),
            details={"task": self.task.name, "kind": QUEUE_LOCK_KIND, "scope": self.policy.scope},
        )
        if self.policy.scope == "life":
            running = redlock.holder(self.run_key)
            if running is not None and (self.publisher is None or holder_id(running) != self.publisher):
                claim.release()
                raise LockBusy.for_key(self.run_key, attempts=1, holder=running, detail="its copy is running")
        return claim

    def _started(self, holder: str | None) -> bool:
        """Whether the holder of the queue lock already runs (holds the run lock)."""
        if not self.policy.run_lock:
            return False
        return holder is not None and holder_id(self.locks.redlock.holder(self.run_key)) == holder

    def _replaced(self, busy: LockBusy) -> bool:
        """With ``on_duplicate="replace"``: revoke a holder that has not started, and free its lock."""
        holder = holder_id(busy.holder)
        if self.policy.on_duplicate != "replace" or holder is None or busy.key != queue_key(self.key):
            return False
        if self._started(holder):
            return False
        self.app.control.revoke(holder)
        free_queue_lock(self.locks.redlock, self.key, holder)
        self.locks.redlock.count(self.task.name, "replaced")
        send_task_event(
            self.app,
            "task-replaced",
            uuid=holder,
            hostname=None,
            publisher=True,
            key=self.key,
            replaced_by=self.task_id,
        )
        logger.info("replaced waiting %s[%s] with %s", self.task.name, holder, self.task_id)
        return True

    def _duplicate(self, busy: LockBusy, result_cls: Callable[[str], Any]) -> Any:
        """What a publish gets when its key is taken, by ``on_duplicate``."""
        holder = holder_id(busy.holder)
        action = "return" if self.policy.on_duplicate == "replace" else self.policy.on_duplicate
        redlock = self.locks.redlock
        redlock.count(self.task.name, "duplicate")
        send_task_event(
            self.app, "task-duplicate", uuid=holder, hostname=None, publisher=True,
            key=self.key, duplicate=self.task_id, action=action,
        )  # fmt: skip
        if action == "return" and holder is not None:
            return result_cls(holder)
        if action == "drop":
            redlock.count(self.task.name, "dropped")
            logger.info("dropped a duplicate of %s[%s] (on_duplicate=drop): %s", self.task.name, holder, busy)
            return None
        raise AlreadyQueued.for_key(
            busy.key or queue_key(self.key),
            attempts=1,
            holder=busy.holder,
            retry_after=busy.retry_after,
            detail=f"a duplicate of {self.task.name}[{holder}]",
        )
