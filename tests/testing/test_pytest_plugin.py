"""The ``celery_dlock`` pytest plugin, used the way a project's own tests would.

The plugin is installed through the ``pytest11`` entry point, so it is loaded
here too: the unit tests below use its fixtures directly, and the pytester
runs prove that a separate pytest process finds it without being told.
"""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import pytest

from celery_dlock.testing.plugin import RedisProcess, RunRecorder, find_redis_server

pytest_plugins = ("pytester",)

#: The user's conftest: Celery's own in-process fixtures, a memory broker.
USER_CONFTEST = """
    import pytest

    pytest_plugins = ("celery.contrib.pytest",)


    @pytest.fixture(scope="session")
    def celery_config():
        return {
            "broker_url": "memory://",
            "broker_transport_options": {"polling_interval": 0.05},
            "result_backend": "cache+memory://",
        }


    @pytest.fixture(scope="session")
    def celery_worker_pool():
        return "threads"


    @pytest.fixture(scope="session")
    def celery_worker_parameters():
        return {"concurrency": 4, "perform_ping_check": False}
"""

#: The user's tests of their single-flight tasks, with the plugin's fixtures.
USER_TESTS = """
    import threading
    import time
    from types import SimpleNamespace

    import pytest

    from celery_dlock import single_flight
    from celery_dlock.testing.plugin import assert_skipped, wait_for_lock


    @pytest.fixture
    def tasks(dlock_app, dlock_runs):
        done = threading.Event()  # the worker runs threads of this process
        together = threading.Barrier(3, timeout=10)

        @dlock_app.task(shared=False)
        @single_flight(key="report:{day}", on_busy="skip")
        @dlock_runs.record()
        def build_report(day):
            done.wait(10)
            return day

        @dlock_app.task(shared=False)
        @single_flight(key="ledger:{account}", requeue_delay=0.02, requeue_max_delay=0.1)
        def charge(account):
            with dlock_runs.record():
                time.sleep(0.02)
            return account

        @dlock_app.task(shared=False)
        def unlocked(account):
            with dlock_runs.record(f"ledger:{account}"):
                together.wait()

        yield SimpleNamespace(build_report=build_report, charge=charge, unlocked=unlocked, done=done)
        done.set()


    def test_a_duplicate_is_skipped(tasks, dlock_app, celery_worker, dlock_runs):
        first = tasks.build_report.delay("mon")
        assert wait_for_lock(dlock_app, "report:mon")["label"] == first.id
        assert_skipped(tasks.build_report.delay("mon"))
        tasks.done.set()
        assert first.get(timeout=10) == "mon"
        assert dlock_runs.assert_ran_once("report:mon").token >= 1


    def test_charges_never_overlap(tasks, celery_worker, dlock_runs):
        results = [tasks.charge.delay("acct-1") for _ in range(8)]
        assert [r.get(timeout=30) for r in results] == ["acct-1"] * 8
        assert len(dlock_runs.runs("ledger:acct-1")) == 8
        dlock_runs.assert_never_overlapped()


    def test_unlocked_runs_overlap(tasks, celery_worker, dlock_runs):
        for result in [tasks.unlocked.delay("acct-2") for _ in range(3)]:
            result.get(timeout=10)
        dlock_runs.assert_never_overlapped()  # fails: nothing kept them apart


    def test_the_session_server(dlock_redis_server, dlock_redis_url):
        assert dlock_redis_url == dlock_redis_server.url
        with dlock_redis_server.client() as client:
            assert client.ping()
"""


def test_a_users_test_suite_uses_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(textwrap.dedent(USER_CONFTEST))
    pytester.makepyfile(test_tasks=textwrap.dedent(USER_TESTS))
    # pytest-celery's plugin, also named "celery", would replace celery_app and
    # celery_worker with Docker-based fixtures; users of the in-process ones turn it off.
    result = pytester.runpytest_subprocess("-p", "no:celery", "-W", "error::pytest.PytestWarning", timeout=120)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_unlocked_runs_overlap*", "*runs overlapped:*", "*'ledger:acct-2': run(*"])


def test_the_cli_doc_example_runs(pytester: pytest.Pytester) -> None:
    """The plugin example in docs/cli.md, run exactly as the page prints it."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    block = page.split("```python\n# conftest.py\n", 1)[1].split("```", 1)[0]
    conftest, tests = block.split("# test_tasks.py\n", 1)
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_tasks=tests)
    result = pytester.runpytest_subprocess("-p", "no:celery", timeout=120)
    result.assert_outcomes(passed=1)


def test_dlock_app_needs_celery_app(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_app(dlock_app):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:celery", timeout=60)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*dlock_app needs the celery_app fixture*"])


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_url(dlock_redis_url):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:celery", "-p", "no:celery_dlock", timeout=60)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'dlock_redis_url' not found*"])


# -- the recorder's assertions ---------------------------------------------------------------


def record_concurrently(recorder: RunRecorder, key: str, runs: int, hold: float) -> None:
    """``runs`` threads, released together, each recording one run of ``hold`` seconds."""
    start = threading.Barrier(runs)

    def body() -> None:
        start.wait()
        with recorder.record(key):
            time.sleep(hold)

    threads = [threading.Thread(target=body) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_overlapping_runs_fail_the_assertion(dlock_runs: RunRecorder) -> None:
    record_concurrently(dlock_runs, "k", runs=3, hold=0.1)
    with pytest.raises(AssertionError, match=r"runs overlapped:\n  'k': run\(pid \d+, token None"):
        dlock_runs.assert_never_overlapped()
    with pytest.raises(AssertionError, match="expected one run of 'k', recorded 3"):
        dlock_runs.assert_ran_once("k")


def test_runs_one_after_another_pass(dlock_runs: RunRecorder) -> None:
    for _ in range(3):
        with dlock_runs.record("k"):
            time.sleep(0.01)
    record_concurrently(dlock_runs, "other", runs=1, hold=0.01)
    dlock_runs.assert_never_overlapped()
    assert [run.key for run in dlock_runs.runs()] == ["k", "k", "k", "other"]
    assert dlock_runs.assert_ran_once("other").token is None


def test_a_run_nested_in_a_long_one_is_an_overlap(dlock_runs: RunRecorder) -> None:
    """The check compares each run with the earlier run that ends last, not just the previous one."""
    with dlock_runs.record("k"):
        with dlock_runs.record("k"):
            pass
        time.sleep(0.01)
        with dlock_runs.record("k"):
            pass
    with pytest.raises(AssertionError) as failure:
        dlock_runs.assert_never_overlapped("k")
    assert str(failure.value).count("started before") == 2


def test_a_body_that_raises_is_recorded(dlock_runs: RunRecorder) -> None:
    @dlock_runs.record("k")
    def body() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        body()
    dlock_runs.assert_ran_once("k")


# -- the launcher --------------------------------------------------------------------------


def test_the_launcher_starts_and_cleans_up() -> None:
    with RedisProcess(["--maxmemory-policy", "allkeys-lru"]) as server:
        proc, directory = server.proc, server.dir
        with server.client(decode_responses=True) as client:
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
            client.set("x", 1)
            server.flushall()
            assert client.dbsize() == 0
    assert proc is not None and proc.poll() is not None, "killed and reaped"
    assert not directory.exists()


def test_the_binary_can_be_chosen(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DLOCK_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="DLOCK_REDIS_SERVER="):
        find_redis_server()


def test_a_server_that_cannot_start_is_reported_and_cleaned_up() -> None:
    server = RedisProcess(["--no-such-directive", "x"])
    with pytest.raises(RuntimeError, match=r"(?s)did not start:.*Bad directive"):
        server.start(timeout=5, attempts=2)
    assert server.proc is None and not server.dir.exists()
