"""The Celery app, configured from Django's settings: every ``CELERY_*`` one, ``CELERY_DLOCK_*`` included."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo")
# CELERY_BEAT_SCHEDULER becomes beat_scheduler, CELERY_DLOCK_REDIS_URL dlock_redis_url, and so on.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
