"""Multi-beat claiming for any scheduler: django-celery-beat's, redbeat's, Celery's own.

Set ``beat_scheduler = "celery_dlock.beat:ClaimingScheduler"`` and name the
scheduler whose runs are to be claimed in ``dlock_beat_scheduler``::

    beat_scheduler = "celery_dlock.beat:ClaimingScheduler"
    dlock_beat_scheduler = "django_celery_beat.schedulers:DatabaseScheduler"

:func:`claiming_scheduler` builds the class from that scheduler and
:class:`~.claims.MultiBeatMixin`, with what the scheduler needs:

* Celery's ``PersistentScheduler`` (and its subclasses) get
  :class:`~.scheduler.MultiBeatScheduler` and its schedule file per beat;
* django-celery-beat's ``DatabaseScheduler`` gets
  :class:`~.database.DatabaseClaims`: the rows are shared by all beats, so
  only the beat that published a run writes it to its row;
* redbeat's ``RedBeatScheduler`` gets :class:`RedBeatClaims`: its leader lock
  is never taken, and only the beat that claimed a run moves its entry on;
* any other ``celery.beat.Scheduler`` gets the mixin alone, which suits
  schedulers that keep their entries in memory.

Neither django-celery-beat nor redbeat is imported here; they are told apart
by the classes they are built from, and :mod:`.database` (which imports
Django) is imported only for a database scheduler.  The design is in ``docs/beat.md``.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from celery.beat import PersistentScheduler, ScheduleEntry, Scheduler
from celery.utils.log import get_logger

from ..celery import compat
from ..celery.app_state import locks_for
from ..lock.errors import ConfigurationError
from .claims import MultiBeatMixin, Outcome
from .scheduler import MultiBeatScheduler

__all__ = ["SETTING", "ClaimingScheduler", "RedBeatClaims", "claiming_scheduler", "scheduler_class"]

logger = get_logger(__name__)

#: The setting that names the scheduler :class:`ClaimingScheduler` builds on.
SETTING: Final = "dlock_beat_scheduler"

_DATABASE_SCHEDULER: Final = "django_celery_beat.schedulers.DatabaseScheduler"
_REDBEAT_SCHEDULER: Final = "redbeat.schedulers.RedBeatScheduler"


class RedBeatClaims(MultiBeatMixin):
    """For redbeat's ``RedBeatScheduler``: no leader lock, and only the claimer moves an entry on.

    redbeat lets one beat run at a time, the holder of its lock
    (``redbeat_lock_key``).  Here every beat is active, so the lock is never
    taken, whatever ``redbeat_lock_key`` says: :attr:`lock_key` is ``None``,
    so redbeat's ``beat_init`` handler returns at once and ``tick`` extends
    nothing.  redbeat keeps each entry's ``last_run_at`` in Redis, shared by
    the beats, and reloads the entries due on every tick; the beat that
    claimed a slot writes it there (redbeat's own ``next``, which also moves
    the entry on in the schedule's sorted set), and the others only remember
    it.  An entry redbeat holds back (``enabled`` false) is not claimed.
    """

    lock_key: str | None

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        if self.lock_key:
            logger.info("beat: redbeat's lock %s is not taken: every beat is active and claims runs", self.lock_key)
        self.lock_key = None

    def maybe_due(self, entry: ScheduleEntry, producer: Any = None, **kwargs: Any) -> float:
        """What redbeat's ``tick`` asks of each entry: claim, record, publish; the seconds to wait."""
        try:
            is_due, next_time_to_run = self.is_due(entry)
        except Exception:
            return compat.failed_entry_delay(self, entry)
        if is_due:
            self.reserve(entry)
            self.apply_entry(entry, producer=producer)
        return float(next_time_to_run)

    def record_slot(self, entry: ScheduleEntry, outcome: Outcome) -> ScheduleEntry:
        """The claimer writes the slot to Redis; the others remember it (see :meth:`last_handled`)."""
        if outcome.state != "won":
            return entry
        return compat.next_entry(entry, outcome.last_run_at)


def claiming_scheduler(base: type[Scheduler]) -> type[Scheduler]:
    """``base`` made to claim each run: a subclass of it and of :class:`~.claims.MultiBeatMixin`.

    ``PersistentScheduler`` itself gives :class:`~.scheduler.MultiBeatScheduler`;
    a class that already claims is returned as it is.  Raises
    :class:`ConfigurationError` for anything but a ``celery.beat.Scheduler`` subclass.
    """
    if not (isinstance(base, type) and issubclass(base, Scheduler)):
        raise ConfigurationError(f"{SETTING}: {base!r} is not a celery.beat.Scheduler subclass")
    if issubclass(base, MultiBeatMixin):
        return base
    if base is PersistentScheduler:
        return MultiBeatScheduler
    built = _built.get(base)
    if built is None:
        mixin = MultiBeatScheduler if issubclass(base, PersistentScheduler) else _claims_for(base)
        doc = f"{base.__module__}.{base.__qualname__}, claiming each run before publishing it ({mixin.__name__})."
        built = type(f"Claiming{base.__name__}", (mixin, base), {"__module__": __name__, "__doc__": doc})
        _built[base] = built
    return built


_built: dict[type[Scheduler], type[Scheduler]] = {}


def _claims_for(base: type[Scheduler]) -> type[MultiBeatMixin]:
    lineage = {f"{klass.__module__}.{klass.__qualname__}" for klass in base.__mro__}
    if _DATABASE_SCHEDULER in lineage:
        from .database import DatabaseClaims  # noqa: PLC0415 - it imports Django, needed only here

        return DatabaseClaims
    if _REDBEAT_SCHEDULER in lineage:
        return RedBeatClaims
    return MultiBeatMixin


def scheduler_class(app: Any) -> type[Scheduler]:
    """The claiming class for the scheduler ``dlock_beat_scheduler`` names.

    Raises :class:`ConfigurationError` naming ``dlock_beat_scheduler`` when
    it is unset, cannot be imported, or is not a scheduler.
    """
    path = locks_for(app).settings.beat_scheduler
    if path is None:
        raise ConfigurationError(
            f"{SETTING} is not set: celery_dlock.beat:ClaimingScheduler claims the runs of the scheduler it "
            'names, as "module:Class", such as "django_celery_beat.schedulers:DatabaseScheduler"'
        )
    module_name, _, attribute = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"{SETTING}: cannot import {path!r}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, Scheduler)):
        raise ConfigurationError(f"{SETTING}: {path!r} is not a celery.beat.Scheduler subclass")
    return claiming_scheduler(found)


class ClaimingScheduler:
    """The scheduler ``dlock_beat_scheduler`` names, claiming each run: a ``beat_scheduler`` value.

    Not a scheduler itself: making one makes an instance of
    :func:`scheduler_class` for the app (so ``celery beat`` prints that
    class), and a bad or missing ``dlock_beat_scheduler`` stops the beat at
    start with a :class:`ConfigurationError` naming it.
    """

    def __new__(cls, app: Any, *args: Any, **kwargs: Any) -> Any:
        """An instance of :func:`scheduler_class` for ``app``, made with these arguments."""
        return scheduler_class(app)(app, *args, **kwargs)
