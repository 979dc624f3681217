"""The demo Django project; its Celery app is loaded with Django, as Celery's Django guide does."""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ["celery_app"]
