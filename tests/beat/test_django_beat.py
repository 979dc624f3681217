"""``ClaimingScheduler`` over django-celery-beat's ``DatabaseScheduler``, in the Django demo project.

The project is ``examples/django`` itself: Celery configured with
``config_from_object("django.conf:settings", namespace="CELERY")``, the
plugin's settings as ``CELERY_DLOCK_*``, a SQLite database migrated for the
test and one ``PeriodicTask`` row (``manage.py add_tick``).  Two real
``celery -A demo beat`` processes share that database; one is killed with
SIGKILL in the middle of the run.  Each slot must run exactly once, with no
slot missing across the kill, and the row must count the runs published.
The beats, the services and the checks are ``test_beat``'s.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.paths import REPO_DIR, import_path
from support.workers import CeleryWorker
from test_beat import BeatGroup, Services, services, two_beats_one_killed

from celery_dlock.testing.process import python_environment

pytest.importorskip("django_celery_beat")

__all__ = ["services"]  # the fixture, shared with test_beat

DJANGO_DIR = REPO_DIR / "examples" / "django"
ENTRY = "tick"  # the PeriodicTask's name, as `manage.py add_tick` makes it


def django_env(services: Services, run: str, database: Path) -> dict[str, str]:
    """The demo project's variables (demo/settings.py) for one test run."""
    return {
        "DJANGO_SETTINGS_MODULE": "demo.settings",
        "DEMO_DATABASE": str(database),
        "DEMO_BROKER_URL": services.broker_url,
        "DEMO_LOCK_URL": services.lock_url,
        "DEMO_KEY_PREFIX": f"dlock:{run}:",
        "DEMO_TALLY_URL": services.recorder_url,
        "DEMO_TALLY_KEY": f"ticks:{run}",
        "PYTHONPATH": os.pathsep.join(import_path(DJANGO_DIR)),
    }


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(DJANGO_DIR / "manage.py"), *args],
        env=python_environment((), env),
        cwd=DJANGO_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def django_group(services: Services, tmp_path: Path) -> Iterator[BeatGroup]:
    """Beats of ``demo`` (its own ``CELERY_BEAT_SCHEDULER``) over a fresh database with the ``tick`` row."""
    group = BeatGroup(services, tmp_path)
    group.env.update(django_env(services, group.run, tmp_path / "db.sqlite3"))
    group.beat_options = {"app": "demo", "scheduler": None}
    manage(group.env, "migrate", "-v", "0")
    assert "added periodic task 'tick'" in manage(group.env, "add_tick", "--every", "1")
    try:
        yield group
    finally:
        group.stop()


def row(database: Path) -> tuple[int, str]:
    with sqlite3.connect(database) as db:
        found: tuple[int, str] = db.execute(
            "SELECT total_run_count, last_run_at FROM django_celery_beat_periodictask WHERE name = ?", (ENTRY,)
        ).fetchone()
    return found


def test_config_from_django_settings_reads_celery_dlock_settings(services: Services, tmp_path: Path) -> None:
    """``CELERY_DLOCK_*`` in settings.py reach the plugin through ``namespace="CELERY"``."""
    env = django_env(services, "conf", tmp_path / "db.sqlite3")
    probe = (
        "import json; from demo.celery import app; from celery_dlock.celery.app_state import locks_for;"
        "s = locks_for(app).settings;"
        "print(json.dumps([app.conf.beat_scheduler, s.beat_scheduler, s.redis_url, s.key_prefix,"
        " s.beat_max_skew, s.on_busy]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=python_environment((), env), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        "celery_dlock.beat:ClaimingScheduler",
        "django_celery_beat.schedulers:DatabaseScheduler",
        [services.lock_url],
        "dlock:conf:",
        5.0,
        "skip",
    ]


@pytest.mark.worker
def test_two_database_beats_publish_each_tick_once_across_a_kill(
    services: Services, django_group: BeatGroup, tmp_path: Path
) -> None:
    """Two beats on one SQLite schedule; SIGKILL the one that sent the latest tick, halfway; the row counts runs."""
    group = django_group
    worker = CeleryWorker(
        broker_url=services.broker_url,
        lock_urls=[services.lock_url],
        recorder_url=services.recorder_url,
        app_module="demo",
        app_dir=DJANGO_DIR,
        env=group.env,
        concurrency=2,
        startup_timeout=60,
    )
    worker.start()
    try:
        beats, runs = two_beats_one_killed(group, ENTRY, r"beat: ClaimingDatabaseScheduler; claims on")
    finally:
        worker.close()

    # The row is written by the publisher alone, once per run: it counts runs, not beats.
    sent = sorted(slot for beat in beats for slot in beat.sent(ENTRY))
    count, last_run_at = row(Path(group.env["DEMO_DATABASE"]))
    assert count == len(sent) == sum(runs.values())
    assert last_run_at.replace(" ", "T")[:19] + "Z" == sent[-1]
