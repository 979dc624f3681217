"""The process launcher, the wait loop and the interval checker of ``celery_dlock.testing``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from celery_dlock.testing.intervals import falling_tokens, overlaps
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.process import ManagedProcess, ProcessError, log_tails

# -- the launcher ----------------------------------------------------------------------


def shell(script: str, tmp_path: Path, name: str = "sh") -> ManagedProcess:
    return ManagedProcess(["sh", "-c", script], log_path=tmp_path / f"{name}.log", name=name)


def test_a_process_logs_and_is_stopped_with_its_exit_status(tmp_path: Path) -> None:
    process = shell("echo ready; trap 'exit 3' TERM; while :; do sleep 0.05; done", tmp_path)
    with process:
        assert process.wait_for_log("ready", timeout=10)
        assert process.running
    assert process.returncode == 3
    assert process.group_pids() == []


def test_kill_takes_the_whole_process_group(tmp_path: Path) -> None:
    process = shell("sleep 60 & sleep 60 & echo started; wait", tmp_path).start()
    process.wait_for_log("started")
    wait_until(lambda: len(process.child_pids()) == 2, message="both children")
    children = process.child_pids()
    process.kill()
    assert process.returncode == -9
    assert process.group_pids() == []
    assert not any(_alive(pid) for pid in children)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process, not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_waiting_on_a_process_that_exits_fails_at_once_with_its_log(tmp_path: Path) -> None:
    process = shell("echo goodbye; exit 7", tmp_path, name="quitter").start()
    with pytest.raises(ProcessError, match=r"(?s)quitter exited with 7 while waiting for 'never'.*goodbye"):
        process.wait_for_log("never", timeout=30)
    assert "--- quitter ---\ngoodbye" in log_tails([process])


def test_pause_and_resume(tmp_path: Path) -> None:
    process = shell("sleep 60", tmp_path).start()
    process.pause()
    assert process.paused and process.running
    process.resume()
    assert not process.paused
    process.pause()
    process.stop(timeout=5)  # SIGTERM reaches a paused process too
    assert process.returncode == -15 and not process.paused
    with pytest.raises(ProcessError, match="not running"):
        process.pause()


def test_leftover_processes_are_killed_when_the_interpreter_exits(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from celery_dlock.testing.process import ManagedProcess, scratch_dir
        process = ManagedProcess(["sleep", "60"], log_path=Path({str(tmp_path)!r}) / "left.log").start()
        print(process.pid, scratch_dir("dlock-left-"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    pid, directory = out.stdout.split()
    assert not Path(directory).exists(), "the scratch directory was left behind"
    wait_until(lambda: not _alive(int(pid)), 5, message="the leftover to die")


# -- the wait loop --------------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, "", "found"])
    assert wait_until(lambda: next(values), 5, interval=0.001) == "found"


def test_wait_until_names_what_it_waited_for_only_on_a_timeout() -> None:
    asked = []

    def message() -> str:
        asked.append(1)
        return "the moon"

    assert wait_until(lambda: True, 1, message=message) is True
    assert asked == []
    with pytest.raises(AssertionError, match=r"timed out after 0\.05s waiting for the moon"):
        wait_until(lambda: False, 0.05, interval=0.01, message=message)


# -- the interval checker ----------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    key: str
    token: int | None
    start: int
    end: int


def test_a_run_nested_in_a_long_one_overlaps_even_after_a_shorter_one() -> None:
    long, short, nested, after = (
        Span("k", 1, 0, 100),
        Span("k", 2, 10, 20),
        Span("k", 3, 30, 40),
        Span("k", 4, 100, 110),
    )
    assert overlaps([after, nested, short, long]) == [(long, short), (long, nested)]
    assert overlaps([Span("a", 1, 0, 10), Span("b", 1, 5, 15)]) == [], "keys are apart"


def test_tokens_must_rise_on_each_key() -> None:
    first, second, third = Span("k", 5, 0, 1), Span("k", 5, 2, 3), Span("k", 7, 4, 5)
    assert falling_tokens([third, first, second, Span("j", 1, 0, 1)]) == [(first, second)]
    unlocked = Span("k", None, 1, 2)
    assert falling_tokens([first, unlocked, third]) == [], "runs without a lock have no token to compare"
    assert falling_tokens([Span("k", 0, 0, 1)]) == [(None, Span("k", 0, 0, 1))], "lock tokens start at 1"


# -- dependencies ----------------------------------------------------------------------------


def test_the_helpers_import_without_celery_and_the_plugin_without_celery() -> None:
    code = (
        "import sys; sys.modules['celery'] = None; sys.modules['kombu'] = None; sys.modules['pytest'] = None\n"
        "import celery_dlock.testing.redis_process, celery_dlock.testing.worker_process\n"
        "import celery_dlock.testing.intervals, celery_dlock.testing.polling\n"
        "del sys.modules['pytest']\n"
        "import celery_dlock.testing.plugin\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
