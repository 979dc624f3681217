"""Multi-beat claiming over django-celery-beat's ``DatabaseScheduler``, whose rows all beats share.

Imported only when :func:`~celery_dlock.beat.claiming_scheduler` builds on a
database scheduler, since it imports Django.
"""

from __future__ import annotations

from celery.beat import ScheduleEntry
from celery.utils.log import get_logger
from django.conf import settings
from django.db import DatabaseError
from django.db.models import F, Q
from django.utils import timezone

from .claims import MultiBeatMixin, Outcome
from .slots import Slot

__all__ = ["DatabaseClaims"]

logger = get_logger(__name__)


class DatabaseClaims(MultiBeatMixin):
    """For django-celery-beat's ``DatabaseScheduler``: one database, shared by every beat.

    Each beat keeps its entries' ``last_run_at`` and ``total_run_count`` in
    memory, slot by slot, and writes nothing back in ``sync``: the row of an
    entry is written only by the beat that published a run, once the broker
    took it, in one ``UPDATE`` that moves ``last_run_at`` to the slot's
    instant (only forward) and adds one to ``total_run_count``.  So the row
    counts the runs published, whichever beat published them, and a beat
    that starts (or reloads the schedule) reads the last published slot.
    The update goes through the query set, not ``save()``: it is no change of
    the schedule, and sends no signal that makes every beat reload it.
    """

    def record_slot(self, entry: ScheduleEntry, outcome: Outcome) -> ScheduleEntry:
        """The entry after the slot, in memory only; the row is written by :meth:`after_publish`."""
        model = entry.model
        model.last_run_at = outcome.last_run_at
        model.total_run_count += 1
        model.no_changes = True
        new_entry: ScheduleEntry = type(entry)(model, app=self.app)
        return new_entry

    def after_publish(self, entry: ScheduleEntry, slot: Slot) -> None:
        """Write the run to the entry's row: ``last_run_at`` forward to the slot, one more run."""
        due = slot.due if settings.USE_TZ else timezone.make_naive(slot.due)
        model = entry.model
        try:
            type(model).objects.filter(pk=model.pk).filter(Q(last_run_at__isnull=True) | Q(last_run_at__lt=due)).update(
                last_run_at=due, total_run_count=F("total_run_count") + 1
            )
        except DatabaseError as exc:
            # The run was sent and its claim stands; only the row lags.
            logger.warning("beat: %s for %s was sent but not written to its row: %r", entry.name, slot.id, exc)
