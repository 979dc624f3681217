"""Testing single-flight tasks: the pytest plugin and the processes a test runs.

* :mod:`~celery_dlock.testing.plugin`: the pytest plugin (fixtures and
  assertions), loaded through the ``pytest11`` entry point;
* :mod:`~celery_dlock.testing.redis_process`: throwaway ``redis-server`` processes;
* :mod:`~celery_dlock.testing.worker_process`: real ``celery worker`` processes;
* :mod:`~celery_dlock.testing.sentinel_process`: a Redis Sentinel deployment
  (a master, its replica, three Sentinels) and ``SENTINEL FAILOVER``;
* :mod:`~celery_dlock.testing.cluster_process`: a Redis Cluster (three
  masters, a replica of each), ``CLUSTER FAILOVER`` and a killed master;
* :mod:`~celery_dlock.testing.process`: the launcher they are all built on, which
  kills whatever is left when the interpreter exits;
* :mod:`~celery_dlock.testing.intervals`: whether recorded runs overlapped,
  and whether their fencing tokens rose;
* :mod:`~celery_dlock.testing.polling`: waiting for a condition.

Only the plugin imports pytest; none of them imports Celery at import time.
"""
