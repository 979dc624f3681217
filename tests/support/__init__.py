"""What the test suite's layers share: servers, workers, recorded critical sections.

* :mod:`support.paths`: where the suite lives, and the import path of the
  processes it starts;
* :mod:`support.redis_servers`: ``redis-server`` nodes a test can kill,
  pause, restart and wipe, on :class:`celery_dlock.testing.redis_process.RedisProcess`;
* :mod:`support.apps`: how a test tells its Celery test apps where their
  servers are, and what those apps share inside a worker;
* :mod:`support.workers`: ``celery worker`` processes running a test app, on
  :class:`celery_dlock.testing.worker_process.WorkerProcess`;
* :mod:`support.worker_stack`: a broker, lock nodes and workers together;
* :mod:`support.critical_sections`: sections that record ``(key, token,
  enter, exit)``, judged by :mod:`celery_dlock.testing.intervals`.

Every process goes through :class:`celery_dlock.testing.process.ManagedProcess`
and every wait through :func:`celery_dlock.testing.polling.wait_until`.
``tests/`` is on ``sys.path`` because ``tests/conftest.py`` is a rootdir
conftest outside any package (pytest's default "prepend" import mode), and on
the ``PYTHONPATH`` of every subprocess through :func:`support.paths.import_path`.
"""
