"""``celery dlock`` invoked in-process, with the context object Celery's ``celery`` command gives it."""

from __future__ import annotations

from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result

from celery_dlock.ops.cli import dlock

__all__ = ["run_dlock"]


def run_dlock(app: Celery, *args: str, input: str | None = None, code: int = 0) -> Result:
    """Invoke ``celery dlock ARGS`` on ``app``; check the exit code."""
    result = CliRunner().invoke(dlock, list(args), input=input, obj=CLIContext(app=app, no_color=True, workdir=None))
    assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return result
