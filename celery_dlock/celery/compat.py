"""Every use of Celery's private API, in one place, for each supported Celery.

Nothing else in the package touches an underscore name of Celery's.  Each
function here names what it reaches for, and :data:`PRIVATE_NAMES` lists
them so that ``tests/celery/test_compat.py`` checks, on every Celery version
CI runs, that they still exist or that the fallback here covers them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from celery import Task
from celery._state import get_current_task
from celery.beat import ScheduleEntry, Scheduler
from celery.local import Proxy
from celery.schedules import BaseSchedule

__all__ = [
    "PRIVATE_NAMES",
    "failed_entry_delay",
    "heap_time",
    "is_lazy_task",
    "next_entry",
    "on_evaluation",
    "registered_task",
    "resolve",
    "running_task",
    "schedule_app",
    "set_heap",
    "stored_entries",
]

logger = logging.getLogger(__name__)

#: ``(owner, attribute)`` for each private name used here; ``optional`` ones
#: have a fallback for the Celery versions that lack them.
PRIVATE_NAMES: Final = (
    ("celery._state", "get_current_task", "required"),
    ("celery.local.Proxy", "_get_current_object", "required"),
    ("celery.local.PromiseProxy", "__then__", "required"),
    ("celery.local.PromiseProxy", "__evaluated__", "required"),
    ("celery.beat.Scheduler", "_when", "required"),
    ("celery.beat.Scheduler", "_heap", "required"),
    ("celery.beat.Scheduler", "_is_due_failed", "optional"),
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

    Celery 5.7 added ``Scheduler._is_due_failed`` for this; on earlier
    versions the same is done here: log the error, retry after ``max_interval``.
    """
    hook = getattr(scheduler, "_is_due_failed", None)
    if hook is not None:
        delay: float = hook(entry)[1]
        return delay
    logger.error(
        "beat: Cannot calculate the next run of %r, trying again in %ss.",
        entry.name,
        scheduler.max_interval,
        exc_info=True,
    )
    return float(scheduler.max_interval)
