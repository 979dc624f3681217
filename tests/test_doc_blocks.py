"""Every Python block of the README, ``docs/`` and the examples' READMEs, run.

A block is a fragment of a user's project, so it runs in the names such a
project has: ``app`` (a Celery app whose locks are on a real redis-server),
``db`` (a client of that server), ``conn``, and the constants the examples
use.  Documented Redis addresses (``redis://10.0.0.1:6379``...) become real
servers.  Running a block decorates its tasks, so every option it shows is
checked as at import; settings it assigns are read back through Celery and
checked as at worker start.  Two blocks are run further: the standalone
Redlock example takes its lock on three servers, and the fenced ledger
write charges an account through its task and refuses a stale token.
"""

from __future__ import annotations

import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from support.paths import TESTS_DIR
from support.redis_servers import RedisCluster

import celery_dlock
from celery_dlock.celery.guard import guard_of
from celery_dlock.celery.settings import Settings

ROOT = TESTS_DIR.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("examples/*/README.md"))]
#: A block with tests in it is a test suite of its own, run as one elsewhere
#: (docs/cli.md's: tests/testing/test_pytest_plugin.py::test_the_cli_doc_example_runs).
RUN_ELSEWHERE = "\ndef test_"
#: Documented lock addresses, replaced by the suite's servers in order.
ADDRESS = re.compile(r"redis://10\.0\.0\.(\d)(?::6379)?(?:/0)?")


def blocks() -> Iterator[Any]:
    """``(place, source)`` for each Python block, ``place`` being ``file:line``."""
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.strip() == "```python":
                end = next(i for i in range(number, len(lines)) if lines[i].strip() == "```")
                place = f"{path.relative_to(ROOT)}:{number}"
                source = "\n".join(lines[number:end])
                if RUN_ELSEWHERE not in source:
                    yield pytest.param(place, source, id=place)


@pytest.fixture
def servers(redis_nodes: Any) -> RedisCluster:
    nodes: RedisCluster = redis_nodes(3)
    return nodes


class BlockCelery(Celery):  # type: ignore[misc]
    """Celery whose tasks stay on their own app.

    ``@app.task`` shares a task with every app made later in the process by
    default; a block's tasks would then show up in other tests' apps.
    """

    def task(self, *args: Any, **options: Any) -> Any:
        """``Celery.task`` with ``shared=False`` unless the block says otherwise."""
        if len(args) == 1 and callable(args[0]) and not options:
            return super().task(shared=False)(args[0])
        options.setdefault("shared", False)
        return super().task(*args, **options)


def namespace(servers: RedisCluster, tmp_path: Path) -> dict[str, Any]:
    """The names a user's module has around the block: the package's public ones too, as earlier blocks import them."""
    app = BlockCelery("docs", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(dlock_redis_url=servers.urls[0], task_always_eager=True, task_store_eager_result=False)
    return {
        **{name: getattr(celery_dlock, name) for name in celery_dlock.__all__},
        "__name__": f"docs_{uuid.uuid4().hex[:8]}",  # tasks are named after it: one per block
        "app": app,
        "Celery": BlockCelery,
        "db": servers[0].client(),
        "conn": sqlite3.connect(":memory:"),
        "BROKER_URL": "memory://",
        "LOCK_URL": servers.urls[0],
        "LOG": str(tmp_path / "ticks.log"),
        "stamp": time.time(),
        "key": "balance",
        "WORK_SECONDS": 0.0,
        "fenced": [],
        "update_balance": lambda account, *, fence: None,
        "write_balance": lambda account, *, fence: None,
    }


@pytest.mark.parametrize(("place", "source"), list(blocks()))
def test_every_python_block_runs(place: str, source: str, servers: RedisCluster, tmp_path: Path) -> None:
    source = ADDRESS.sub(lambda m: servers.urls[int(m.group(1)) - 1], source)
    names = namespace(servers, tmp_path)
    exec(compile(source, place, "exec"), names)

    # Settings a block assigns, Celery's or Django's, are what a worker would start with.
    assigned = {name: value for name, value in names.items() if name.startswith(("CELERY_", "dlock_", "beat_"))}
    settings_app = Celery("docs-settings", set_as_current=False)
    settings_app.conf.update(
        {name.removeprefix("CELERY_").lower(): value for name, value in assigned.items()},
        dlock_redis_url=servers.urls[0],
    )
    Settings.from_app(settings_app)
    app = names["app"]
    if app.conf.get("dlock_redis_url"):  # a block that makes its own app sets no lock address of ours
        Settings.from_app(app)
    if "single_flight" in source and "def " in source:
        assert any(guard_of(task) is not None for task in app.tasks.values()), "no task of the block is single-flight"


def test_the_standalone_redlock_example_takes_its_lock_on_three_servers(servers: RedisCluster) -> None:
    (source,) = [s for place, s in (p.values for p in blocks()) if "redlock = Redlock(" in s]
    fences: list[int] = []
    names: dict[str, Any] = {"update_balance": lambda account, *, fence: fences.append(fence)}
    exec(ADDRESS.sub(lambda m: servers.urls[int(m.group(1)) - 1], source), names)
    assert len(fences) == 1 and fences[0] > 0
    assert not any(client.exists("dlock:lock:ledger:42") for client in servers.clients())


def test_the_fenced_ledger_write_refuses_a_stale_token(servers: RedisCluster, tmp_path: Path) -> None:
    (source,) = [s for place, s in (p.values for p in blocks()) if "FENCED_ADD = " in s]
    names = namespace(servers, tmp_path)
    exec(source, names)
    charge, db = names["charge"], names["db"]
    assert guard_of(charge) is not None
    charge.apply(args=(7, 5)).get()
    assert int(db.get("balance:7")) == 5
    db.set("fence:7", 10**15)  # a newer holder has written
    with pytest.raises(RuntimeError, match="refused"):
        charge.apply(args=(7, 5)).get()
    assert int(db.get("balance:7")) == 5
