"""Operating the locks: inspection, forced release, health checks, ``celery dlock``."""
