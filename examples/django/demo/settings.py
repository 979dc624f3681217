"""Settings of the demo project: SQLite, django-celery-beat, and Celery with celery_dlock.

The addresses come from the environment, which ``run.py`` (and the tests)
set; the defaults suit a Redis on localhost:

``DEMO_DATABASE``    the SQLite file the beats share (``db.sqlite3`` here)
``DEMO_BROKER_URL``  the Celery broker
``DEMO_LOCK_URL``    ``dlock_redis_url``: where the beats' claims and the task locks live
``DEMO_KEY_PREFIX``  ``dlock_key_prefix``
``DEMO_TALLY_URL``   the Redis the tick task records its runs in
``DEMO_TALLY_KEY``   the list it records them in
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "demo-only-not-a-secret"  # a demo that serves no requests
DEBUG = False
ALLOWED_HOSTS: list[str] = []
INSTALLED_APPS = ["django_celery_beat", "ticks"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DEMO_DATABASE", str(BASE_DIR / "db.sqlite3")),
        # Two beats and a management command write to one file: wait for it.
        "OPTIONS": {"timeout": 20},
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# -- Celery, read by demo/celery.py with namespace="CELERY" --------------------------

CELERY_BROKER_URL = os.environ.get("DEMO_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
# Every beat is active: each claims a run in Redis before publishing it, and
# the entries are django-celery-beat's PeriodicTask rows.
CELERY_BEAT_SCHEDULER = "celery_dlock.beat:ClaimingScheduler"
CELERY_BEAT_MAX_LOOP_INTERVAL = 1.0

# -- celery_dlock -----------------------------------------------------------------------

CELERY_DLOCK_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_DLOCK_REDIS_URL = os.environ.get("DEMO_LOCK_URL", CELERY_BROKER_URL)
CELERY_DLOCK_KEY_PREFIX = os.environ.get("DEMO_KEY_PREFIX", "demo:")
CELERY_DLOCK_BEAT_MAX_SKEW = 5.0
CELERY_DLOCK_ON_BUSY = "skip"

# -- the demo's own -----------------------------------------------------------------------

DEMO_TALLY_URL = os.environ.get("DEMO_TALLY_URL", CELERY_DLOCK_REDIS_URL)
DEMO_TALLY_KEY = os.environ.get("DEMO_TALLY_KEY", "demo:ticks")
