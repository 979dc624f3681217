"""The lock around one task's body: key, acquire, busy policy, release.

:class:`SingleFlight` is what every way of using the plugin ends up calling:
the decorator, the base class and the app-wide ``task_cls``.  Its
:meth:`~SingleFlight.run` takes the lock in the worker before the body runs,
holds it (the watchdog renewing it) for the whole body, and releases it in a
``finally``, so success, failure, ``retry()``, ``Ignore``, ``Reject`` and soft
time limits all release.  Paths where the pool process dies are covered by the
signal hooks in :mod:`celery_dlock.celery.signals`, which find the dead run's lock by
the owner prefix set here.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, NoReturn, TypeVar

from celery import current_app, states
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from ..lock.errors import DLockError, LockBusy, LockUnavailable, TaskSkipped
from .events import send_task_event
from ..lock.faults import fault_point
from ..lock.handoff import AlreadyClaimed, Handoff, QueueFull
from .keys import KeySpec
from .options import Policy, SingleFlightOptions
from ..lock.redlock import Lock
from .app_state import AppLocks, locks_for

__all__ = [
    "REQUEUES_HEADER",
    "TICKET_HEADER",
    "SingleFlight",
    "current_lock",
    "owner_prefix",
    "publish_handoff",
]

logger = get_task_logger(__name__)
_plain_logger = logging.getLogger(__name__)

#: The message header counting lock-busy requeues, apart from ``retries``.
REQUEUES_HEADER: Final = "dlock_requeues"

#: The header of a handed-off message: ``<ticket>@<retries>``.  A copy made
#: by ``retry()`` carries the header but a higher ``retries``, and so counts
#: as a new arrival rather than a claim on a spent ticket.
TICKET_HEADER: Final = "dlock_ticket"

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

    def key_for(self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The lock key of one call; ``args`` never include the task itself."""
        name = task.name if task is not None else self.name
        return self.keys(name, self.is_bound(task)).build(args, kwargs)

    def is_bound(self, task: Any) -> bool:
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
        hold_for = _hold_seconds(policy.hold, policy.ttl)
        if policy.hold is not None and policy.hold is not True:
            key = f"{key}@{int(_scheduled_time(request) // policy.hold)}"
        outside_worker = request is None or request.called_directly or request.is_eager
        on_lost = _LossReporter(task, app, task_id, hostname)
        try:
            if policy.queues and not outside_worker:
                lock = self._acquire_queued(task, app, locks, request, policy, key, on_lost)
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
                    count_as=_label(task, self),
                    details={"task": _label(task, self)},
                )
        except LockBusy as busy:
            self._busy(task, app, request, policy, busy)
        except LockUnavailable as down:
            if policy.fail_mode == "open":
                logger.warning("running %s unlocked (dlock_fail_mode=open): %s", _describe(task, task_id), down)
                return body()
            self._requeue(task, app, request, policy, down)

        send_task_event(app, "task-lock-acquired", uuid=task_id, hostname=hostname, key=key, token=lock.token)
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
            if succeeded and hold_for:
                lock.keep(hold_for())
            else:
                lock.release_nowait()
            handoff = getattr(lock, "handoff", None)
            if handoff is not None:
                _hand_on(app, handoff)

    def release_dead_run(
        self, task: Any, task_id: str, hostname: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> bool:
        """Free the lock of a run whose pool process died; called in the main process.

        With a handoff queue, the key goes straight to the next parked message.
        """
        locks = locks_for(task.app)
        try:
            key = self.key_for(task, args or (), kwargs or {})
            prefix = owner_prefix(task_id, hostname)
            policy = self.policy(locks)
            if not policy.queues:
                return locks.redlock.release_owner(key, prefix)
            released, handoff = locks.handoff_queue.release_owner(key, prefix, policy.ttl)
        except (DLockError, TypeError, ValueError) as exc:
            _plain_logger.warning("could not free the lock of dead task %s[%s]: %s", task.name, task_id, exc)
            return False
        if handoff is not None:
            publish_handoff(task.app, handoff)
        return released

    # -- handoff queues ---------------------------------------------------------------

    def _acquire_queued(
        self, task: Any, app: Any, locks: AppLocks, request: Any, policy: Policy, key: str, on_lost: Any
    ) -> Lock:
        """Take the key, or park this message in its queue and raise ``Ignore``."""
        ticket = _ticket_of(request)
        queue = locks.handoff_queue
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
                logger.info("dropped a second copy of handed-off %s", _describe(task, request.id))
                raise Ignore() from None
            except LockBusy as busy:
                stranded: Handoff | None = getattr(busy, "handoff", None)
                if stranded is not None:
                    publish_handoff(app, stranded)
                if ticket is not None:
                    # Our ticket is still parked and will be handed off again.
                    raise Ignore() from None
                if self._park(task, app, request, policy, key, busy):
                    raise Ignore() from None
        raise LockBusy.for_key(key, attempts=_PARK_ATTEMPTS, detail="the key kept changing hands")

    def _park(self, task: Any, app: Any, request: Any, policy: Policy, key: str, busy: LockBusy) -> bool:
        """Park the message behind the holder; False if the key came free."""
        coalesce = policy.on_busy == "coalesce"
        rider = locks_for(app).handoff_queue.park(
            key, request.id, _message_of(task, request), max_queued=policy.max_queued, coalesce=coalesce
        )
        if rider is None:
            return False
        if rider != request.id:
            logger.info("coalesced into %s[%s]: %s", task.name, rider, busy)
            if not request.ignore_result and not task.ignore_result:
                task.backend.store_result(request.id, {"coalesced_into": rider}, states.SUCCESS, request=request)
            _report(app, task, request, "coalesced", key=key, into=rider)
        else:
            logger.info("parked behind the holder of %r: %s", key, busy)
            _report(app, task, request, "parked", key=key)
        return True

    # -- busy policies ----------------------------------------------------------------

    def _busy(self, task: Any, app: Any, request: Any, policy: Policy, busy: LockBusy) -> NoReturn:
        if isinstance(busy, QueueFull) and policy.queue_full == "reject":
            raise busy
        if request is not None and request.id and busy.holder and busy.holder.get("label") == request.id:
            # Another copy of this very task holds the key: a redelivery, a
            # retry sent before that run released, or a message requeued after
            # its worker died.  Skipping or failing it would overwrite the
            # result of a run that may still succeed, or lose the task; it
            # waits its turn instead.
            self._requeue(task, app, request, policy, busy)
        action = policy.wait_fallback if policy.on_busy == "wait" else _fallbacks.get(policy.on_busy, policy.on_busy)
        outside_worker = request is None or request.called_directly or request.is_eager
        if action == "raise" or (action == "requeue" and outside_worker):
            raise busy
        if action == "skip":
            self._skip(task, app, request, busy, outside_worker)
        self._requeue(task, app, request, policy, busy)

    def _skip(self, task: Any, app: Any, request: Any, busy: LockBusy, outside_worker: bool) -> NoReturn:
        skipped = TaskSkipped.for_key(
            busy.key or "", attempts=busy.attempts, holder=busy.holder, detail="skipped (on_busy=skip)"
        )
        if outside_worker:
            raise skipped
        logger.warning("skipped: %s", skipped)
        if not request.ignore_result and not task.ignore_result:
            task.backend.store_result(request.id, skipped, states.FAILURE, request=request)
        _report(app, task, request, "skipped", key=busy.key, holder=busy.holder)
        raise Ignore()

    def _requeue(self, task: Any, app: Any, request: Any, policy: Policy, cause: DLockError) -> NoReturn:
        if request is None or request.called_directly or request.is_eager:
            raise cause
        headers = dict(request.headers or {})
        headers.pop(TICKET_HEADER, None)
        done = int(headers.get(REQUEUES_HEADER, 0))
        if done >= policy.max_requeues:
            raise _give_up(cause, done, policy.max_requeues)
        countdown = backoff(done, policy)
        headers[REQUEUES_HEADER] = done + 1
        task.signature_from_request(request, countdown=countdown, headers=headers).apply_async()
        logger.info("requeued in %.2fs (%d/%d): %s", countdown, done + 1, policy.max_requeues, cause)
        _report(app, task, request, "requeued", key=cause.key, countdown=countdown, requeues=done + 1)
        raise Ignore()


class _LossReporter:
    """Called by the watchdog when a running task's lock is lost."""

    def __init__(self, task: Any, app: Any, task_id: str | None, hostname: str | None) -> None:
        self.task, self.app, self.task_id, self.hostname = task, app, task_id, hostname

    def __call__(self, lock: Lock, error: DLockError) -> None:
        logger.warning("lock %r of %s lost mid-body: %s", lock.key, _describe(self.task, self.task_id), error)
        if lock.count_as:
            locks_for(self.app).redlock.count(lock.count_as, "lost")
        send_task_event(
            self.app,
            "task-lock-lost",
            uuid=self.task_id,
            hostname=self.hostname,
            key=lock.key,
            token=lock.token,
            reason=str(error),
        )
        hook = getattr(self.task, "on_lock_lost", None)
        if hook is not None:
            hook(lock, error)


#: Queueing policies fall back to a requeue when they cannot park.
_fallbacks: Final = {"queue": "requeue", "coalesce": "requeue"}


def publish_handoff(app: Any, handoff: Handoff) -> None:
    """Publish a parked message whose turn has come, claiming with its ticket."""
    fault_point("before-handoff-publish")
    message = json_loads(handoff.payload)
    signature = app.signature(message)
    options = dict(signature.options)
    headers = dict(options.pop("headers", None) or {})
    headers[TICKET_HEADER] = f"{handoff.ticket}@{options.get('retries', 0)}"
    options.pop("task_id", None)
    signature.apply_async(task_id=handoff.ticket, headers=headers, **options)


def _hand_on(app: Any, handoff: Handoff) -> None:
    """Publish a handoff from a body's ``finally``, never failing the body for it.

    If the broker refuses it, the ticket stays at the head of its queue and
    the key stays reserved for it; the worker's sweep hands it on again once
    the reservation runs out.
    """
    try:
        publish_handoff(app, handoff)
    except Exception:
        logger.exception("could not hand %r on to %s; the sweep will retry", handoff.key, handoff.ticket)


def _message_of(task: Any, request: Any) -> bytes:
    """The message to publish again at handoff: the task, its arguments and options."""
    signature = task.signature_from_request(request)
    message = dict(signature)
    options = dict(message.get("options") or {})
    headers = dict(options.get("headers") or {})
    headers.pop(TICKET_HEADER, None)
    options["headers"] = headers
    options.pop("task_id", None)
    message["options"] = options
    encoded: str = json_dumps(message)
    return encoded.encode()


def _ticket_of(request: Any) -> str | None:
    """The ticket a handed-off message claims with, unless a retry copied it."""
    value = (request.headers or {}).get(TICKET_HEADER)
    if not isinstance(value, str) or "@" not in value:
        return None
    ticket, _, retries = value.rpartition("@")
    return ticket if retries == str(request.retries) else None


#: The header in which the multi-beat scheduler stamps a run's due instant.
BEAT_SLOT_HEADER: Final = "dlock_beat_slot"


def _scheduled_time(request: Any) -> float:
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


_binds_run: dict[type, bool] = {}


def _runs_bound(task_class: type) -> bool:
    """Whether a task class's ``run`` takes the task first (``bind=True``)."""
    bound = _binds_run.get(task_class)
    if bound is None:
        bound = _binds_run[task_class] = not isinstance(inspect.getattr_static(task_class, "run", None), staticmethod)
    return bound


def _report(app: Any, task: Any, request: Any, what: str, **fields: Any) -> None:
    """Count ``what`` happening to a run and send its ``task-<what>`` event."""
    locks_for(app).redlock.count(task.name, what)
    send_task_event(app, f"task-{what}", uuid=request.id, hostname=request.hostname, **fields)


def _label(task: Any, guard: SingleFlight) -> str:
    """What a run's counters are kept under: its task's name."""
    return task.name if task is not None else guard.name


def _describe(task: Any, task_id: str | None) -> str:
    name = getattr(task, "name", None) or "<direct call>"
    return f"{name}[{task_id}]" if task_id else name
