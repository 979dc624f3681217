"""Every use of Celery's private API, in one place, and the Celery version floor.

Nothing else in the package touches an underscore name of Celery's.  Each
function here names what it reaches for, and :data:`PRIVATE_NAMES` lists
them so that ``tests/test_architecture.py`` checks, on every Celery version
CI runs, that they still exist or that the fallback here covers them.

Importing this module (which ``celery_dlock.celery`` does first, so every
Celery-facing part of the package does) refuses a Celery older than
:data:`MINIMUM_CELERY`, or one whose version cannot be read: see
:func:`require_supported_celery`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import celery
from celery import Task
from celery._state import get_current_task
from celery.beat import ScheduleEntry, Scheduler
from celery.local import Proxy
from celery.schedules import BaseSchedule

__all__ = [
    "MINIMUM_CELERY",
    "PRIVATE_NAMES",
    "UnsupportedCelery",
    "failed_entry_delay",
    "heap_time",
    "is_lazy_task",
    "next_entry",
    "on_evaluation",
    "registered_task",
    "require_supported_celery",
    "resolve",
    "running_task",
    "schedule_app",
    "set_heap",
    "stored_entries",
]

#: The oldest Celery the package runs on.  Before 5.7, ``AsyncResult.get()``
#: on a result the caller has already received still waits a whole drain
#: interval (a second) before it looks (``Drainer.drain_events_until`` in
#: ``celery/backends/asynchronous.py``), so results of requeued tasks reach
#: their callers about ten times late.  ``tests/test_celery_floor.py`` shows
#: that wait on 5.6.3 and its absence here.
MINIMUM_CELERY: Final = (5, 7)


class UnsupportedCelery(ImportError):
    """The installed Celery is older than :data:`MINIMUM_CELERY`, or its version cannot be read."""


def require_supported_celery(version: str | None = None) -> None:
    """Refuse a Celery older than :data:`MINIMUM_CELERY`, naming the version found.

    ``version`` defaults to the installed Celery's ``__version__``.  A version
    that does not start with ``MAJOR.MINOR`` is refused too: the floor is
    checked, never assumed.

    Raises:
        UnsupportedCelery: the version is older than the floor, or unreadable.

    """
    found = celery.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", str(found))
    floor = ".".join(map(str, MINIMUM_CELERY))
    if match is None:
        raise UnsupportedCelery(
            f"celery_dlock needs Celery {floor} or newer, and cannot read the installed Celery's version ({found!r})"
        )
    if (int(match[1]), int(match[2])) < MINIMUM_CELERY:
        raise UnsupportedCelery(
            f"celery_dlock needs Celery {floor} or newer; this is Celery {found}. Before {floor}, "
            "AsyncResult.get() on a result already received waits a whole second before it looks "
            f"(see 'Why Celery {floor}' in the README): upgrade Celery, e.g. pip install 'celery>={floor}'"
        )


require_supported_celery()

#: ``(owner, attribute)`` for each private name used here; ``optional`` ones
#: have a fallback for the Celery versions that lack them.
PRIVATE_NAMES: Final = (
    ("celery._state", "get_current_task", "required"),
    ("celery.local.Proxy", "_get_current_object", "required"),
    ("celery.local.PromiseProxy", "__then__", "required"),
    ("celery.local.PromiseProxy", "__evaluated__", "required"),
    ("celery.beat.Scheduler", "_when", "required"),
    ("celery.beat.Scheduler", "_heap", "required"),
    ("celery.beat.Scheduler", "_is_due_failed", "required"),
    ("celery.beat.PersistentScheduler", "_store", "required"),
    ("celery.beat.ScheduleEntry", "_next_instance", "required"),
    ("celery.schedules.BaseSchedule", "_app", "required"),
    ("celery.app.base.Celery", "_tasks", "required"),
)


# -- tasks --------------------------------------------------------------------------


def running_task() -> Task | None:
    """The task whose body runs in this thread, or ``None``."""
    task: Task | None = get_current_task()
    return task


def is_lazy_task(target: Any) -> bool:
    """Whether ``target`` is an ``@app.task`` not yet created (a promise of a task)."""
    return isinstance(target, Proxy) and hasattr(target, "__then__") and not target.__evaluated__()


def on_evaluation(proxy: Any, callback: Callable[..., Any], *args: Any) -> None:
    """Call ``callback(*args)`` once the lazy task ``proxy`` is created."""
    proxy.__then__(callback, *args)


def resolve(target: Any) -> Any:
    """The object behind a Celery proxy, or ``target`` itself."""
    return target._get_current_object() if isinstance(target, Proxy) else target


def registered_task(app: Any, name: str) -> Task | None:
    """The task ``name`` as ``app`` registered it in this process, without finalizing the app.

    ``app.tasks`` would finalize it (or raise with ``autofinalize=False``);
    Celery's own ``send_task`` reads the registry underneath it the same way.
    """
    task: Task | None = app._tasks.get(name)
    return task


# -- beat ---------------------------------------------------------------------------


def stored_entries(scheduler: Any) -> dict[str, ScheduleEntry]:
    """A persistent scheduler's entries as its shelve holds them."""
    entries: dict[str, ScheduleEntry] = scheduler._store["entries"]
    return entries


def schedule_app(schedule: BaseSchedule) -> Any:
    """The app a schedule was bound to, or ``None`` (reading ``.app`` would fall back to the current one)."""
    return schedule._app


def next_entry(entry: ScheduleEntry, last_run_at: datetime) -> ScheduleEntry:
    """The entry as it is after a run at ``last_run_at``."""
    return entry._next_instance(last_run_at=last_run_at)


def heap_time(scheduler: Scheduler, entry: ScheduleEntry, delay: float) -> float:
    """The heap timestamp of ``entry`` due in ``delay`` seconds."""
    when: float = scheduler._when(entry, delay)
    return when


def set_heap(scheduler: Scheduler, heap: list[Any] | None) -> None:
    """Replace the scheduler's heap (``None`` makes it rebuild on the next tick)."""
    scheduler._heap = heap


def failed_entry_delay(scheduler: Scheduler, entry: ScheduleEntry) -> float:
    """Seconds before an entry whose next run could not be computed is tried again.

    Celery's ``Scheduler._is_due_failed`` (5.7 and newer) logs the error and
    says when to retry.
    """
    delay: float = scheduler._is_due_failed(entry)[1]
    return delay
