"""``@single_flight``: make a task single-flight with one line.

It works below ``@app.task`` / ``@shared_task`` (on the function) or above it
(on the task), with ``bind=True`` or without::

    @app.task
    @single_flight(key="ledger:{account_id}", ttl=30, on_busy="requeue")
    def charge(account_id, amount):
        ...

Options are checked at once: a key template naming an argument the function
does not have raises when the module is imported.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, overload

from celery import Task

from .compat import is_lazy_task, on_evaluation, resolve, running_task
from .guard import SingleFlight, guard_of, guarded_by
from .keys import KeyTemplate
from .options import SingleFlightOptions
from .signals import connect_signals

__all__ = ["single_flight"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def single_flight(target: F, /) -> F: ...


@overload
def single_flight(
    *,
    key: KeyTemplate = None,
    ttl: float | None = None,
    limit: int | None = None,
    on_busy: str | None = None,
    max_requeues: int | None = None,
    requeue_delay: float | None = None,
    requeue_max_delay: float | None = None,
    wait_timeout: float | None = None,
    wait_fallback: str | None = None,
    fail_mode: str | None = None,
    max_hold: float | None = None,
    max_queued: int | None = None,
    queue_full: str | None = None,
    hold: float | bool | timedelta | None = None,
    scope: str | None = None,
    on_duplicate: str | None = None,
    queue_ttl: float | None = None,
    dedupe_completed: bool | None = None,
) -> Callable[[F], F]: ...


def single_flight(target: Any = None, /, **options: Any) -> Any:
    """Run the decorated task at most once at a time per key.

    Arguments (all keyword-only; ``None`` takes the app's ``dlock_*`` setting):
        key: ``None`` to hash the bound arguments, a template such as
            ``"ledger:{account_id}"``, or a callable taking the task's
            arguments and returning the key.
        ttl: The lease in seconds, renewed while the body runs.
        limit: How many runs of one key may run at once: above 1, each holds
            one of the key's semaphore permits, and ``on_busy`` applies once
            all are taken (not ``queue`` or ``coalesce``).
        on_busy: ``"requeue"``, ``"skip"``, ``"wait"``, ``"raise"``,
            ``"queue"`` or ``"coalesce"``.
        max_requeues: Lock-busy requeues allowed per message, counted apart
            from the task's own ``max_retries``.
        requeue_delay: The first requeue countdown; it doubles, jittered.
        requeue_max_delay: The longest requeue countdown.
        wait_timeout: How long ``on_busy="wait"`` blocks in the worker.
        wait_fallback: ``"requeue"``, ``"skip"`` or ``"raise"`` after a wait.
        fail_mode: ``"closed"`` (never run unlocked) or ``"open"``.
        max_hold: Stop renewing after this many seconds.
        max_queued: For ``queue`` and ``coalesce``, the most messages one
            key's queue may hold.
        queue_full: ``"requeue"`` or ``"reject"`` when that queue is full.
        hold: Keep the lock after the body succeeds: ``True`` until the ttl
            runs out, or a period (seconds or a timedelta) to the end of the
            current slot of that length, so that duplicates of one periodic
            run run once.  Duplicates are skipped unless ``on_busy`` is given.
        dedupe_completed: Keep a done-marker per task id after a success
            (for ``dlock_dedupe_ttl`` seconds), so that a redelivered copy
            of a task that already succeeded is acked and not run again.

    Used bare, as ``@single_flight``, every option takes its default.
    """
    settings = SingleFlightOptions(**options)
    if target is not None:
        return _decorate(target, settings)
    return functools.partial(_decorate, options=settings)


def _decorate(target: Any, options: SingleFlightOptions) -> Any:
    connect_signals()
    if is_lazy_task(target):
        # A lazy @app.task: guard the task once the app creates it.
        on_evaluation(target, _guard_task, target, options)
        return target
    if resolve(target) is not target:
        _guard_task(resolve(target), options)
        return target
    if isinstance(target, Task):
        return _guard_task(target, options)
    if callable(target):
        return _guard_function(target, options)
    raise TypeError(f"single_flight: cannot decorate {target!r}; expected a function or a task")


def _guard_function(function: Callable[..., Any], options: SingleFlightOptions) -> Callable[..., Any]:
    if guard_of(function) is not None:
        raise TypeError(f"single_flight: {function.__qualname__} is already single-flight")
    guard = SingleFlight(options, function)

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        task = running_task()
        if task is None or guard_of(task) is not guard:
            task = None  # called as a plain function, not as this task's body
        call_args = args[1:] if guard.is_bound(task) else args
        return guard.run(task, lambda: function(*args, **kwargs), call_args, kwargs)

    guarded_by(guarded, guard)
    return guarded


def _guard_task(task: Any, options: SingleFlightOptions) -> Any:
    task = resolve(task)
    if guard_of(task) is not None:
        raise TypeError(f"single_flight: task {task.name!r} is already single-flight")
    raw = inspect.getattr_static(type(task), "run")
    bound = not isinstance(raw, staticmethod)
    function = raw.__func__ if isinstance(raw, staticmethod) else raw
    guard = SingleFlight(options, function, bound=bound)
    original = task.run

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        return guard.run(task, lambda: original(*args, **kwargs), args, kwargs)

    guarded_by(run, guard)
    task.run = run
    return task
