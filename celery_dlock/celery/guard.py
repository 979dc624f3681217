"""The lock around one task's body: key, acquire, busy policy, release.

:class:`SingleFlight` is what every way of using the plugin ends up calling:
the decorator, the base class and the app-wide ``task_cls``.  Its
:meth:`~SingleFlight.run` takes the lock in the worker before the body runs,
holds it (the watchdog renewing it) for the whole body, and releases it in a
``finally``, so success, failure, ``retry()``, ``Ignore``, ``Reject`` and soft
time limits all release.  Paths where the pool process dies are covered by the
signal hooks in :mod:`celery_dlock.celery.signals`, which find the dead run's
lock by the owner prefix set here.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

from celery import Celery, Task, current_app, states
from celery.app.task import Context
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from ..lock.errors import DLockError, LockBusy, LockUnavailable
from ..lock.handoff import AlreadyClaimed, HandoffPending, QueuedLock
from ..lock.lease import Lock
from .app_state import AppLocks, locks_for
from .busy import busy_action, on_busy, outside_worker, requeue
from .dedupe import completed, mark_completed
from .events import LossReporter, RunWatch, describe, report, send_task_event, store_outcome
from .handoffs import hand_on, message_of, publish_handoff, ticket_of
from .headers import BEAT_SLOT_HEADER
from .keys import KeySpec
from .options import Policy, SingleFlightOptions
from .scopes import free_queue_lock

__all__ = ["SingleFlight", "current_lock", "guard_of", "guarded_by", "owner_prefix"]

logger = get_task_logger(__name__)
_plain_logger = logging.getLogger(__name__)

#: How often a run whose key keeps flipping between free and busy tries to
#: take it or park before it falls back to a requeue.
_PARK_ATTEMPTS: Final = 3

_current: contextvars.ContextVar[Lock | None] = contextvars.ContextVar("celery_dlock_lock", default=None)

T = TypeVar("T")


def current_lock() -> Lock | None:
    """The lock held by the task body running in this context, if any."""
    return _current.get()


def owner_prefix(task_id: str | None, hostname: str | None) -> str:
    """The start of the owner value of a task run, known to the worker's main process."""
    if not task_id:
        return ""
    return f"{task_id}/{hostname or ''}/"


_guards: weakref.WeakKeyDictionary[Callable[..., Any], SingleFlight] = weakref.WeakKeyDictionary()


def guarded_by(function: Callable[..., Any], guard: SingleFlight) -> None:
    """Record that ``function`` (a task's ``run``) runs its body under ``guard``."""
    _guards[function] = guard


def guard_of(target: Any) -> SingleFlight | None:
    """The :class:`SingleFlight` of a task, or of a task's ``run`` function, or ``None``."""
    run = getattr(target, "run", target)
    run = getattr(run, "__func__", run)
    try:
        return _guards.get(run)
    except TypeError:  # not weak-referenceable, so never registered
        return None


class SingleFlight:
    """Single-flight behaviour for one task function.

    Built once, when the task is decorated; checks the options and the key
    template against the function's signature then.
    """

    def __init__(
        self, options: SingleFlightOptions, function: Callable[..., Any], *, bound: bool | None = None
    ) -> None:
        self.options = options
        self.function = function
        #: Whether ``function`` takes the task first (``bind=True``); ``None``
        #: when only the task class can tell.
        self.bound = bound
        self.name = f"{function.__module__}.{function.__qualname__}"
        try:
            self.signature: inspect.Signature | None = inspect.signature(function)
        except (TypeError, ValueError):
            self.signature = None
        # Check the template against every argument name now, at import.
        KeySpec(options.key, task_name=self.name, signature=self.signature)
        self._keys: dict[tuple[str, bool], KeySpec] = {}
        self._policy: tuple[Any, Policy] | None = None

    def __repr__(self) -> str:
        return f"<SingleFlight {self.name} {self.options}>"

    def keys(self, task_name: str, bound: bool) -> KeySpec:
        """The key builder of the task named ``task_name``.

        ``bound`` says whether the function takes the task first; keys are
        always built from the call's arguments without it.
        """
        spec = self._keys.get((task_name, bound))
        if spec is None:
            signature = self.signature
            if bound and signature is not None:
                signature = signature.replace(parameters=list(signature.parameters.values())[1:])
            spec = self._keys[(task_name, bound)] = KeySpec(self.options.key, task_name=task_name, signature=signature)
        return spec

    def key_for(self, task: Task | None, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The lock key of one call; ``args`` never include the task itself."""
        name = task.name if task is not None else self.name
        return self.keys(name, self.is_bound(task)).build(args, kwargs)

    def is_bound(self, task: Task | None) -> bool:
        """Whether the guarded function takes the task as its first argument."""
        if self.bound is not None:
            return self.bound
        return task is not None and _runs_bound(type(task))

    def policy(self, locks: AppLocks) -> Policy:
        """The options in force, resolved against the app's settings once."""
        cached = self._policy
        if cached is None or cached[0] is not locks.settings:
            cached = self._policy = (locks.settings, self.options.resolve(locks.settings))
        return cached[1]

    def run_key(self, key: str, policy: Policy, scheduled: float) -> str:
        """The lock key of a run due at ``scheduled``: with ``hold=period``, its period's key."""
        if policy.hold is None or policy.hold is True:
            return key
        return f"{key}@{int(scheduled // policy.hold)}"

    def label(self, task: Task | None) -> str:
        """What a run's counters are kept under: its task's name."""
        return task.name if task is not None else self.name

    # -- the wrapped body ---------------------------------------------------------

    def run(self, task: Task | None, body: Callable[[], T], args: Sequence[Any], kwargs: Mapping[str, Any]) -> T:
        """Run ``body`` holding the lock for ``task`` called with these arguments.

        ``args`` never include the task itself.  ``task`` is ``None`` when the
        function is called outside any task; the current app's settings apply.
        """
        app: Celery = task.app if task is not None else current_app
        locks = locks_for(app)
        policy = self.policy(locks)
        request: Context | None = task.request if task is not None else None
        task_id = getattr(request, "id", None)
        hostname = getattr(request, "hostname", None)
        base = self.key_for(task, args, kwargs)
        queued = task_id if policy.publish_lock and not outside_worker(request) else None
        if not policy.run_lock:
            # scope="queue": the message has started; the next may be queued.
            free_queue_lock(locks.redlock, base, queued)
            return body()
        key = self.run_key(base, policy, _scheduled_time(request))
        hold_for = _hold_seconds(policy.hold, policy.ttl)
        on_lost = LossReporter(task, app, task_id, hostname)
        watch = RunWatch(locks, self.label(task), request)
        try:
            if policy.queues and task is not None and request is not None and not outside_worker(request):
                lock = self._acquire_queued(task, app, request, policy, key, on_lost)
            else:
                lock = locks.redlock.acquire(
                    key,
                    policy.ttl,
                    blocking=policy.on_busy == "wait",
                    timeout=policy.wait_timeout,
                    auto_extend=True,
                    max_hold=policy.max_hold,
                    label=task_id,
                    owner_prefix=owner_prefix(task_id, hostname),
                    on_lost=on_lost,
                    count_as=self.label(task),
                    details={"task": self.label(task)},
                    limit=policy.limit,
                )
        except LockBusy as busy:
            raise self._not_taken(task, app, request, policy, busy, base, queued)  # noqa: B904 - busy is the cause
        except LockUnavailable as down:
            if policy.fail_mode != "open":
                raise self._not_taken(task, app, request, policy, down, base, queued)  # noqa: B904
            logger.warning("running %s unlocked (dlock_fail_mode=open): %s", describe(task, task_id), down)
            free_queue_lock(locks.redlock, base, queued)
            return body()

        # The run lock is held before the queue lock goes, so that "life" never has a gap.
        free_queue_lock(locks.redlock, base, queued)
        dedupes = policy.dedupe_completed and task_id is not None and not outside_worker(request)
        if dedupes:
            self._skip_completed(task, app, request, policy, lock, base, queued)
        send_task_event(app, "task-lock-acquired", uuid=task_id, hostname=hostname, key=key, token=lock.token)
        watch.granted(lock)
        locks.hold(lock)
        context = _current.set(lock)
        succeeded = False
        try:
            result = body()
            succeeded = True
            return result
        finally:
            _current.reset(context)
            locks.drop(lock)
            if succeeded and dedupes:
                # Under the lock, so a copy that takes it next sees the marker.
                mark_completed(locks.redlock, str(task_id), policy.dedupe_ttl)
            watch.ended(lock, kept=succeeded and bool(hold_for))
            _let_go(app, lock, hold_for() if succeeded and hold_for else None)

    def _not_taken(
        self,
        task: Task | None,
        app: Celery,
        request: Context | None,
        policy: Policy,
        cause: DLockError,
        base: str,
        queued: str | None,
    ) -> BaseException:
        """What a run whose run lock was not taken ends with; its queue lock goes unless a copy waits on."""
        if isinstance(cause, LockBusy):
            ending = on_busy(task, app, request, policy, cause)
            waits = busy_action(policy, request, cause) == "requeue"
        else:
            ending, waits = requeue(task, app, request, policy, cause), True
        if not (waits and isinstance(ending, Ignore)):
            # The message ends here: only a requeued copy still waits, keeping the queue lock.
            free_queue_lock(locks_for(app).redlock, base, queued)
        return ending

    def _skip_completed(
        self,
        task: Task | None,
        app: Celery,
        request: Context | None,
        policy: Policy,
        lock: Lock,
        base: str,
        queued: str | None,
    ) -> None:
        """Raise ``Ignore`` (the message is acked, unrun) if this task id already succeeded."""
        task_id = str(getattr(request, "id", ""))
        try:
            done = completed(locks_for(app).redlock, task_id)
        except LockUnavailable as down:
            lock.release_nowait()
            raise self._not_taken(task, app, request, policy, down, base, queued) from None
        if done and task is not None and request is not None:
            lock.release_nowait()
            logger.info("%s already succeeded: acked, not run again (dedupe_completed)", describe(task, task_id))
            report(app, task, request, "deduped", key=lock.key)
            raise Ignore()

    def release_dead_run(
        self, task: Task, task_id: str, hostname: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> bool:
        """Free the lock of a run whose pool process died; called in the main process.

        With a handoff queue, the key goes straight to the next parked message.
        """
        locks = locks_for(task.app)
        try:
            base = self.key_for(task, args or (), kwargs or {})
            prefix = owner_prefix(task_id, hostname)
            policy = self.policy(locks)
            if not policy.queues:
                # With hold=period the run's key names its period, unknown here:
                # try this one and the one before (only the dead run's owner matches).
                now = time.time()
                period = float(policy.hold) if policy.hold not in (None, True) else 0.0
                keys = dict.fromkeys(self.run_key(base, policy, moment) for moment in (now, now - period))
                return any([locks.redlock.release_owner(key, prefix, limit=policy.limit) for key in keys])
            released, handoff = locks.handoff_queue.release_owner(base, prefix, policy.ttl)
        except (DLockError, TypeError, ValueError) as exc:
            _plain_logger.warning("could not free the lock of dead task %s[%s]: %s", task.name, task_id, exc)
            return False
        if handoff is not None:
            publish_handoff(task.app, handoff)
        return released

    def release_queued(self, task: Task, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """Free the queue lock of a message that will never start (revoked, expired); main process."""
        locks = locks_for(task.app)
        if not self.policy(locks).publish_lock:
            return False
        try:
            key = self.key_for(task, args or (), kwargs or {})
        except (TypeError, ValueError) as exc:
            _plain_logger.warning("could not free the queue lock of %s[%s]: %s", task.name, task_id, exc)
            return False
        return free_queue_lock(locks.redlock, key, task_id)

    # -- handoff queues ---------------------------------------------------------------

    def _acquire_queued(
        self, task: Task, app: Celery, request: Context, policy: Policy, key: str, on_lost: LossReporter
    ) -> Lock:
        """Take the key, or park this message in its queue and raise ``Ignore``."""
        ticket = ticket_of(request)
        queue = locks_for(app).handoff_queue
        for _ in range(_PARK_ATTEMPTS):
            try:
                return queue.acquire(
                    key,
                    policy.ttl,
                    ticket=ticket,
                    on_lost=on_lost,
                    max_hold=policy.max_hold,
                    label=request.id,
                    owner_prefix=owner_prefix(request.id, request.hostname),
                    count_as=task.name,
                    details={"task": task.name},
                )
            except AlreadyClaimed:
                logger.info("dropped a second copy of handed-off %s", describe(task, request.id))
                raise Ignore() from None
            except LockBusy as busy:
                if isinstance(busy, HandoffPending):
                    publish_handoff(app, busy.handoff)
                if ticket is not None:
                    # Our ticket is still parked and will be handed off again.
                    raise Ignore() from None
                if self._park(task, app, request, policy, key, busy):
                    raise Ignore() from None
        raise LockBusy.for_key(key, attempts=_PARK_ATTEMPTS, detail="the key kept changing hands")

    def _park(self, task: Task, app: Celery, request: Context, policy: Policy, key: str, busy: LockBusy) -> bool:
        """Park the message behind the holder; False if the key came free."""
        coalesce = policy.on_busy == "coalesce"
        rider = locks_for(app).handoff_queue.park(
            key, request.id, message_of(task, request), max_queued=policy.max_queued, coalesce=coalesce
        )
        if rider is None:
            return False
        if rider != request.id:
            logger.info("coalesced into %s[%s]: %s", task.name, rider, busy)
            # Served by the rider, this message ends: it no longer waits in the broker.
            free_queue_lock(locks_for(app).redlock, key, request.id if policy.publish_lock else None)
            served = {"coalesced_into": rider}
            # Flower keeps only the fields it knows of an event: ``into`` is
            # for other receivers, ``result`` is what Flower shows.
            report(app, task, request, "coalesced", key=key, into=rider, result=repr(served))
            store_outcome(app, task, request, states.SUCCESS, served)
        else:
            logger.info("parked behind the holder of %r: %s", key, busy)
            report(app, task, request, "parked", key=key)
        return True


def _let_go(app: Celery, lock: Lock, hold: float | None) -> None:
    """End a run's hold on its lock: keep it ``hold`` seconds more, or release it and hand on its queue."""
    if hold is not None:
        lock.keep(hold)
    else:
        lock.release_nowait()
    if isinstance(lock, QueuedLock) and lock.handoff is not None:
        hand_on(app, lock.handoff)


def _scheduled_time(request: Context | None) -> float:
    """When a run was due: the beat slot it was published for, else now.

    A run published by :mod:`celery_dlock.beat` names its slot, so its period
    is exact even if the message waited in the queue past the boundary.
    """
    slot = (getattr(request, "headers", None) or {}).get(BEAT_SLOT_HEADER)
    if isinstance(slot, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(slot.replace("Z", "+00:00")).timestamp()
    return time.time()


def _hold_seconds(hold: float | bool | None, ttl: float) -> Callable[[], float] | None:
    """How long a successful run keeps its lock, computed when it ends."""
    if not hold:
        return None
    if hold is True:
        return lambda: ttl
    period = float(hold)
    return lambda: max(0.001, period - time.time() % period)


_binds_run: dict[type, bool] = {}


def _runs_bound(task_class: type) -> bool:
    """Whether a task class's ``run`` takes the task first (``bind=True``)."""
    bound = _binds_run.get(task_class)
    if bound is None:
        bound = _binds_run[task_class] = not isinstance(inspect.getattr_static(task_class, "run", None), staticmethod)
    return bound
