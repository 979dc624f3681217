"""``python manage.py add_tick [--name tick] [--every 1]``: the periodic task, as a PeriodicTask row."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django_celery_beat.models import IntervalSchedule, PeriodicTask


class Command(BaseCommand):
    """Create (or update) the ``ticks.tick`` periodic task, due every ``--every`` seconds."""

    help = "Schedule ticks.tick every --every seconds, as the PeriodicTask --name."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", default="tick", help="the PeriodicTask's name (default: tick)")
        parser.add_argument("--every", type=int, default=1, help="its interval in seconds (default: 1)")

    def handle(self, *args: Any, **options: Any) -> None:
        interval, _ = IntervalSchedule.objects.get_or_create(every=options["every"], period=IntervalSchedule.SECONDS)
        task, created = PeriodicTask.objects.update_or_create(
            name=options["name"], defaults={"task": "ticks.tick", "interval": interval, "enabled": True}
        )
        verb = "added" if created else "updated"
        self.stdout.write(f"{verb} periodic task {task.name!r}: ticks.tick every {interval.every} s")
