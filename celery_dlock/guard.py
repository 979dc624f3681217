"""The lock around one task's body: key, acquire, busy policy, release.

:class:`SingleFlight` is what every way of using the plugin ends up calling:
the decorator, the base class and the app-wide ``task_cls``.  Its
:meth:`~SingleFlight.run` takes the lock in the worker before the body runs,
holds it (the watchdog renewing it) for the whole body, and releases it in a
``finally``, so success, failure, ``retry()``, ``Ignore``, ``Reject`` and soft
time limits all release.  Paths where the pool process dies are covered by the
signal hooks in :mod:`celery_dlock.signals`, which find the dead run's lock by
the owner prefix set here.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from celery import current_app, states
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from .errors import DLockError, LockBusy, LockUnavailable, TaskSkipped
from .events import send_task_event
from .keys import KeySpec
from .options import Policy, SingleFlightOptions
from .redlock import Lock
from .runtime import AppLocks, locks_for

__all__ = ["REQUEUES_HEADER", "SingleFlight", "current_lock", "owner_prefix"]

logger = get_task_logger(__name__)
_plain_logger = logging.getLogger(__name__)

#: The message header counting lock-busy requeues, apart from ``retries``.
REQUEUES_HEADER: Final = "dlock_requeues"

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
            spec = self._keys[(task_name, bound)] = KeySpec(
                self.options.key, task_name=task_name, signature=signature
            )
        return spec

    def key_for(self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The lock key of one call; ``args`` never include the task itself."""
        name = task.name if task is not None else self.name
        return self.keys(name, self.is_bound(task)).build(args, kwargs)

    def is_bound(self, task: Any) -> bool:
        """Whether the guarded function takes the task as its first argument."""
        if self.bound is not None:
            return self.bound
        return task is not None and not isinstance(
            inspect.getattr_static(type(task), "run", None), staticmethod
        )

    def policy(self, locks: AppLocks) -> Policy:
        """The options in force, resolved against the app's settings once."""
        cached = self._policy
        if cached is None or cached[0] is not locks.settings:
            cached = self._policy = (locks.settings, self.options.resolve(locks.settings))
        return cached[1]

    # -- the wrapped body ---------------------------------------------------------

    def run(
        self,
        task: Any,
        body: Callable[[], T],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> T:
        """Run ``body`` holding the lock for ``task`` called with these arguments.

        ``args`` never include the task itself.  ``task`` is ``None`` when the
        function is called outside any task; the current app's settings apply.
        """
        app = task.app if task is not None else current_app
        locks = locks_for(app)
        policy = self.policy(locks)
        request = task.request if task is not None else None
        task_id = getattr(request, "id", None)
        hostname = getattr(request, "hostname", None)
        key = self.key_for(task, args, kwargs)
        try:
            lock = locks.redlock.acquire(
                key,
                policy.ttl,
                blocking=policy.on_busy == "wait",
                timeout=policy.wait_timeout,
                auto_extend=True,
                max_hold=policy.max_hold,
                label=task_id,
                owner_prefix=owner_prefix(task_id, hostname),
                on_lost=_LossReporter(task, app, task_id, hostname),
            )
        except LockBusy as busy:
            return self._busy(task, app, request, policy, busy)  # type: ignore[no-any-return]
        except LockUnavailable as down:
            if policy.fail_mode == "open":
                logger.warning("running %s unlocked (dlock_fail_mode=open): %s", _describe(task, task_id), down)
                return body()
            self._requeue(task, app, request, policy, down)

        send_task_event(app, "task-lock-acquired", uuid=task_id, hostname=hostname, key=key, token=lock.token)
        locks.hold(lock)
        context = _current.set(lock)
        try:
            return body()
        finally:
            _current.reset(context)
            locks.drop(lock)
            lock.release()

    def release_dead_run(
        self, task: Any, task_id: str, hostname: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> bool:
        """Free the lock of a run whose pool process died; called in the main process."""
        try:
            key = self.key_for(task, args or (), kwargs or {})
            return locks_for(task.app).redlock.release_owner(key, owner_prefix(task_id, hostname))
        except (DLockError, TypeError, ValueError) as exc:
            _plain_logger.warning("could not free the lock of dead task %s[%s]: %s", task.name, task_id, exc)
            return False

    # -- busy policies ----------------------------------------------------------------

    def _busy(self, task: Any, app: Any, request: Any, policy: Policy, busy: LockBusy) -> None:
        action = policy.wait_fallback if policy.on_busy == "wait" else policy.on_busy
        outside_worker = request is None or request.called_directly or request.is_eager
        if action == "raise" or (action == "requeue" and outside_worker):
            raise busy
        if action == "skip":
            self._skip(task, app, request, busy, outside_worker)
        self._requeue(task, app, request, policy, busy)

    def _skip(self, task: Any, app: Any, request: Any, busy: LockBusy, outside_worker: bool) -> None:
        skipped = TaskSkipped.for_key(
            busy.key or "", attempts=busy.attempts, holder=busy.holder, detail="skipped (on_busy=skip)"
        )
        if outside_worker:
            raise skipped
        logger.warning("skipped: %s", skipped)
        if not request.ignore_result and not task.ignore_result:
            task.backend.store_result(request.id, skipped, states.FAILURE, request=request)
        send_task_event(
            app, "task-skipped", uuid=request.id, hostname=request.hostname,
            key=busy.key, holder=busy.holder,
        )
        raise Ignore()

    def _requeue(self, task: Any, app: Any, request: Any, policy: Policy, cause: DLockError) -> None:
        if request is None or request.called_directly or request.is_eager:
            raise cause
        headers = dict(request.headers or {})
        done = int(headers.get(REQUEUES_HEADER, 0))
        if done >= policy.max_requeues:
            raise _give_up(cause, done, policy.max_requeues)
        countdown = backoff(done, policy)
        headers[REQUEUES_HEADER] = done + 1
        task.signature_from_request(request, countdown=countdown, headers=headers).apply_async()
        logger.info("requeued in %.2fs (%d/%d): %s", countdown, done + 1, policy.max_requeues, cause)
        send_task_event(
            app, "task-requeued", uuid=request.id, hostname=request.hostname,
            key=cause.key, countdown=countdown, requeues=done + 1,
        )
        raise Ignore()


class _LossReporter:
    """Called by the watchdog when a running task's lock is lost."""

    def __init__(self, task: Any, app: Any, task_id: str | None, hostname: str | None) -> None:
        self.task, self.app, self.task_id, self.hostname = task, app, task_id, hostname

    def __call__(self, lock: Lock, error: DLockError) -> None:
        logger.warning("lock %r of %s lost mid-body: %s", lock.key, _describe(self.task, self.task_id), error)
        send_task_event(
            self.app, "task-lock-lost", uuid=self.task_id, hostname=self.hostname,
            key=lock.key, token=lock.token, reason=str(error),
        )
        hook = getattr(self.task, "on_lock_lost", None)
        if hook is not None:
            hook(lock, error)


def backoff(requeues: int, policy: Policy) -> float:
    """The countdown before requeue number ``requeues + 1``: doubling, capped, jittered."""
    ceiling = min(policy.requeue_max_delay, policy.requeue_delay * 2 ** min(requeues, 32))
    return random.uniform(ceiling / 2, ceiling)


def _give_up(cause: DLockError, done: int, limit: int) -> DLockError:
    detail = f"requeued {done} time(s), max_requeues={limit}"
    if isinstance(cause, LockBusy):
        return LockBusy.for_key(cause.key or "", attempts=done, holder=cause.holder, detail=detail)
    errors = cause.errors if isinstance(cause, LockUnavailable) else ()
    return LockUnavailable.for_key(cause.key, attempts=done, errors=errors, reason=f"unreachable; {detail}")


def _describe(task: Any, task_id: str | None) -> str:
    name = getattr(task, "name", None) or "<direct call>"
    return f"{name}[{task_id}]" if task_id else name
