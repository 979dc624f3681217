"""Testing single-flight tasks: the pytest plugin and a throwaway redis-server.

The plugin is :mod:`celery_dlock.testing.plugin`, loaded through the
``pytest11`` entry point; :mod:`celery_dlock.testing.redis_process` starts
real ``redis-server`` processes for it and for any test suite.
"""
