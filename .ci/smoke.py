"""Smoke test of an installed celery_dlock: a real worker, a real Redis, one contended key.

Run by ``.ci/run`` from fresh virtualenvs: one with the built wheel and no
extras (a bare ``pip install celery-dlock``), and one with the lowest
supported Celery.  It imports only what such an install has.  Exits 0 when
``RUNS`` calls of a single-flight task on one key all ran, one at a time.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import redis

from celery_dlock.testing.redis_process import RedisProcess
from celery_dlock.testing.worker_process import WorkerProcess

RUNS = 12

APP = '''
import os, time
import redis
from celery import Celery
from celery_dlock import single_flight

URL = os.environ["SMOKE_REDIS_URL"]
app = Celery("smoke_app", broker=URL, backend=URL)
app.conf.update(dlock_requeue_delay=0.05, dlock_requeue_max_delay=0.5, broker_connection_retry_on_startup=True)
recorder = redis.Redis.from_url(URL)

@app.task
@single_flight(key="smoke:{n}")
def touch(n, i):
    if recorder.incr("smoke:inside") > 1:
        recorder.incr("smoke:overlaps")
    time.sleep(0.05)
    recorder.decr("smoke:inside")
    recorder.incr("smoke:ran")
    return i
'''


def main() -> int:
    import celery

    work = Path(tempfile.mkdtemp(prefix="dlock-smoke-"))
    (work / "smoke_app.py").write_text(textwrap.dedent(APP))
    with RedisProcess() as server:
        env = {"SMOKE_REDIS_URL": server.url}
        os.environ.update(env)
        sys.path.insert(0, str(work))
        from smoke_app import app, touch  # the same module the worker imports

        with WorkerProcess("smoke_app", concurrency=4, pythonpath=[work], env=env):
            started = time.monotonic()
            results = [touch.delay(1, i) for i in range(RUNS)]
            values = sorted(result.get(timeout=60) for result in results)
            elapsed = time.monotonic() - started
            # AsyncResult.__del__ unsubscribes from the backend: let it, while Redis is up.
            del results
            gc.collect()
        recorder = redis.Redis.from_url(server.url)
        ran = int(recorder.get("smoke:ran") or 0)
        overlaps = int(recorder.get("smoke:overlaps") or 0)
        app.close()
    print(f"smoke (celery {celery.__version__}): {ran} runs of {RUNS}, {overlaps} overlaps, {elapsed:.1f}s")
    return 0 if values == list(range(RUNS)) and ran == RUNS and overlaps == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
