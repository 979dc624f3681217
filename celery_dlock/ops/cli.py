"""``celery dlock``: inspect and manage the locks of a Celery app.

Registered through the ``celery.commands`` entry point, so each subcommand
works on the app given to ``celery -A``::

    celery -A proj dlock list 'ledger:*'
    celery -A proj dlock show ledger:42
    celery -A proj dlock release ledger:42
    celery -A proj dlock purge --prefix ledger:
    celery -A proj dlock reap --dry-run
    celery -A proj dlock stats
    celery -A proj dlock doctor
    celery -A proj dlock top
    celery -A proj dlock history ledger:42
    celery -A proj dlock metrics --port 9808

The work is done by :mod:`celery_dlock.ops.inspect`, :mod:`celery_dlock.ops.doctor`,
:mod:`celery_dlock.ops.top` and :mod:`celery_dlock.ops.metrics`; this module only formats it.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Final, TypeVar

import click
from celery.bin.base import CeleryCommand, CeleryOption
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_FAILURE, EX_UNAVAILABLE
from redis.exceptions import RedisError

from ..celery.app_state import locks_for
from ..celery.reaper import offline_locks, release_locks
from ..celery.timings import is_histogram_event
from ..lock.errors import LockUnavailable
from ..lock.keyspace import glob_escape
from .doctor import Check, Verdict, diagnose, worst
from .inspect import HeldLock, Released, force_release, held_locks, lock_details, parked_tickets, permit_holders
from .tables import table
from .top import Top, render, run_live, sample_twice
from .views import history_table, lock_details_text, lock_table, permit_table

__all__ = ["EVENTS", "dlock"]

#: The counters ``celery dlock stats`` shows, in this order, per task.
EVENTS: Final = ("acquired", "busy", "requeued", "skipped", "lost", "released", "parked", "coalesced")


_VERDICT_COLOURS: Final = {Verdict.OK: "green", Verdict.WARN: "yellow", Verdict.FAIL: "red"}

F = TypeVar("F", bound=Callable[..., Any])


class DLockCommand(CeleryCommand):  # type: ignore[misc]
    """A Celery command that turns an unreachable lock service into a clean exit."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; exit with EX_UNAVAILABLE if no lock node answers."""
        try:
            return super().invoke(ctx)
        except (LockUnavailable, RedisError) as exc:
            raise CeleryCommandException(
                message=f"the lock service cannot be reached: {exc}", exit_code=EX_UNAVAILABLE
            ) from exc


def _json_option(command: F) -> F:
    return click.option(
        "--json",
        "as_json",
        cls=CeleryOption,
        is_flag=True,
        help_group="Output Options",
        help="Print JSON instead of text.",
    )(command)


def _yes_option(command: F) -> F:
    return click.option(
        "-y",
        "--yes",
        cls=CeleryOption,
        is_flag=True,
        help_group="Release Options",
        help="Do not ask for confirmation.",
    )(command)


@click.group(name="dlock")
def dlock() -> None:
    """Inspect and manage celery_dlock's single-flight locks."""


@dlock.command(name="list", cls=DLockCommand)
@click.argument("pattern", default="*")
@_json_option
@click.pass_context
def list_(ctx: click.Context, pattern: str, as_json: bool) -> None:
    """List held locks, or those whose key matches PATTERN.

    PATTERN is a Redis glob such as 'ledger:*'; by default every lock is listed.

    The task name shows as '-' unless the holder recorded it: a lock stores
    its task id, and a handoff reservation the task of its parked message.
    """
    found = held_locks(_app(ctx), pattern)
    if as_json:
        _echo_json(ctx, [lock.as_dict() for lock in found])
    elif found:
        ctx.obj.echo(lock_table(found))
    else:
        ctx.obj.echo(f"no held locks match {pattern!r}")


@dlock.command(cls=DLockCommand)
@click.argument("key")
@_json_option
@click.pass_context
def show(ctx: click.Context, key: str, as_json: bool) -> None:
    """Show the lock on KEY in full, with the messages parked behind it, or its permit holders."""
    app = _app(ctx)
    lock = lock_details(app, key)
    tickets = parked_tickets(app, key)
    permits = permit_holders(app, key)
    if as_json:
        _echo_json(
            ctx, {"lock": lock.as_dict() if lock else None, "parked": [asdict(t) for t in tickets], "permits": permits}
        )
    elif permits and lock is None:
        ctx.obj.echo(f"permits of {key!r}: {len(permits)} held, oldest first")
        ctx.obj.echo(permit_table(permits))
    else:
        ctx.obj.echo(lock_details_text(lock) if lock else f"lock {key!r} is not held")
        if tickets:
            ctx.obj.echo(f"parked: {len(tickets)} message(s), next first")
            for number, parked in enumerate(tickets, 1):
                ctx.obj.echo(f"  {number}. {parked.ticket}  {parked.task or '-'}")
    if lock is None and not tickets and not permits:
        ctx.exit(1)


@dlock.command(cls=DLockCommand)
@click.argument("key")
@_yes_option
@click.pass_context
def release(ctx: click.Context, key: str, yes: bool) -> None:
    """Force-release the lock on KEY, whoever holds it.

    Its holder, if still running, is no longer protected.  Messages parked
    behind the lock are handed on at once.
    """
    app = _app(ctx)
    lock = lock_details(app, key)
    if lock is None:
        ctx.obj.error(f"lock {key!r} is not held")
        ctx.exit(1)
    _confirm(ctx, [lock], yes)
    _echo_released(ctx, force_release(app, [key]))


@dlock.command(cls=DLockCommand)
@click.option(
    "--prefix",
    required=True,
    cls=CeleryOption,
    help_group="Release Options",
    help="Release every lock whose key starts with this.",
)
@_yes_option
@click.pass_context
def purge(ctx: click.Context, prefix: str, yes: bool) -> None:
    """Force-release every lock whose key starts with --prefix."""
    if not prefix:
        raise click.BadParameter("must not be empty", param_hint="--prefix")
    app = _app(ctx)
    found = [lock for lock in held_locks(app, glob_escape(prefix) + "*") if lock.key.startswith(prefix)]
    if not found:
        ctx.obj.echo(f"no held locks start with {prefix!r}")
        return
    _confirm(ctx, found, yes)
    released = force_release(app, [lock.key for lock in found], command="purge")
    _echo_released(ctx, released)
    ctx.obj.echo(f"released {len(released.removed)} lock(s)")


@dlock.command(cls=DLockCommand)
@click.option(
    "--dry-run",
    cls=CeleryOption,
    is_flag=True,
    help_group="Release Options",
    help="List the offline workers' locks; release nothing.",
)
@click.option(
    "--grace",
    cls=CeleryOption,
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help_group="Release Options",
    help="Seconds between the two pings a worker must leave unanswered.",
)
@_yes_option
@click.pass_context
def reap(ctx: click.Context, dry_run: bool, grace: float, yes: bool) -> None:
    """Release the locks of task runs whose worker is offline.

    The workers named in the held locks' owners are pinged twice, --grace
    seconds apart; the locks of those that answer neither ping are released
    by their run's owner prefix, so a key taken since by a live run is kept.
    """
    app = _app(ctx)
    found = offline_locks(app, grace=grace)
    if not found:
        ctx.obj.echo("no locks of offline workers")
        return
    rows = [[run.hostname, run.key, run.task_id, str(run.token)] for run in found]
    ctx.obj.echo(table(["WORKER", "KEY", "TASK ID", "TOKEN"], rows))
    if dry_run:
        ctx.obj.echo(f"dry run: {len(found)} lock(s) of offline workers, none released")
        return
    if not yes:
        click.confirm(f"Release {len(found)} lock(s) of offline workers?", abort=True)
    released = release_locks(locks_for(app).redlock, found)
    ctx.obj.echo(f"released {len(released)} lock(s) of {len({run.hostname for run in released})} offline worker(s)")


@dlock.command(cls=DLockCommand)
@_json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Show the lock counters of each task: acquired, busy, requeued..."""
    counters = locks_for(_app(ctx)).redlock.stats()
    found = {event for counts in counters.values() for event in counts if not is_histogram_event(event)}
    events = [*EVENTS, *sorted(found - set(EVENTS))]
    by_task = {task: {event: counts.get(event, 0) for event in events} for task, counts in sorted(counters.items())}
    if as_json:
        _echo_json(ctx, by_task)
    elif by_task:
        rows = [[task, *(str(n) for n in counts.values())] for task, counts in by_task.items()]
        ctx.obj.echo(table(["TASK", *(event.upper() for event in events)], rows))
    else:
        ctx.obj.echo("no counters yet")


@dlock.command(cls=DLockCommand)
@_json_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the settings, the lock nodes and the tasks' timings.

    Prints one line per check, OK, WARN or FAIL, and exits with status 1 if
    any check failed.
    """
    app = ctx.obj.app
    app.loader.import_default_modules()
    checks = diagnose(app)
    verdict = worst(checks)
    if as_json:
        _echo_json(ctx, {"verdict": verdict.value, "checks": [check.as_dict() for check in checks]})
    else:
        _echo_checks(ctx, checks)
    if verdict is Verdict.FAIL:
        ctx.exit(EX_FAILURE)


@dlock.command(cls=DLockCommand)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    cls=CeleryOption,
    help_group="Display Options",
    help="Seconds between refreshes.",
)
@click.pass_context
def top(ctx: click.Context, interval: float) -> None:
    """A live view of the hottest keys and the lock rates.

    The held keys, hottest first, with their holders, how long each has held,
    and the waiters and parked messages behind them; and the acquired, busy
    and lost rates per task over the last minute.  Refreshed every second; q
    or Ctrl-C quits.  When stdout is not a terminal it prints one table (two
    samples INTERVAL apart, for the rates) and exits.
    """
    viewer = Top(_app(ctx))
    if sys.stdout.isatty() and sys.stdin.isatty():
        run_live(viewer, interval)
    else:
        ctx.obj.echo("\n".join(render(sample_twice(viewer, interval))))


@dlock.command(cls=DLockCommand)
@click.argument("key")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=20,
    cls=CeleryOption,
    help_group="Output Options",
    help="How many of the latest entries to show.",
)
@_json_option
@click.pass_context
def history(ctx: click.Context, key: str, count: int, as_json: bool) -> None:
    """Show the history of the lock on KEY.

    Its latest grants, releases, losses and forced releases, oldest first.
    Kept only with the dlock_history setting on: each key's stream holds its
    latest dlock_history entries.
    """
    locks = locks_for(_app(ctx))
    if not locks.settings.history:
        ctx.obj.error("no history is kept: set dlock_history (say, 100) on the app and its workers")
        ctx.exit(1)
    entries = locks.history.read(key, count)
    if as_json:
        _echo_json(ctx, [entry.as_dict() for entry in entries])
    elif entries:
        ctx.obj.echo(history_table([entry.as_dict() for entry in entries]))
    else:
        ctx.obj.echo(f"no history for {key!r}")


@dlock.command(cls=DLockCommand)
@click.option(
    "--port", type=int, default=9808, cls=CeleryOption, help_group="Exporter Options", help="Port to listen on."
)
@click.option(
    "--address",
    default="0.0.0.0",
    cls=CeleryOption,
    help_group="Exporter Options",
    help="Address to listen on.",
)
@click.pass_context
def metrics(ctx: click.Context, port: int, address: str) -> None:
    """Serve Prometheus metrics on --port.

    At http://ADDRESS:PORT/metrics: the shared counters, the wait and hold
    histograms, and the locks held and messages parked right now.  Needs the
    metrics extra: pip install 'celery-dlock[metrics]'.
    """
    app = _app(ctx)
    try:
        from .metrics import serve  # noqa: PLC0415 - prometheus_client is optional
    except ImportError as exc:
        raise CeleryCommandException(
            message=f"{exc}: install the metrics extra, pip install 'celery-dlock[metrics]'", exit_code=EX_FAILURE
        ) from exc
    server = serve(app, port, address)
    ctx.obj.echo(f"serving celery_dlock metrics on http://{address}:{server.server_port}/metrics")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


# -- helpers ---------------------------------------------------------------------------


def _app(ctx: click.Context) -> Any:
    """The app, once its dlock settings and nodes are known to be valid."""
    app = ctx.obj.app
    try:
        locks_for(app).redlock  # noqa: B018 - builds the nodes, which checks them
    except ValueError as exc:  # a ConfigurationError, a node given twice, a bad URL
        raise CeleryCommandException(
            message=f"bad dlock settings: {exc} (see 'celery dlock doctor')", exit_code=EX_FAILURE
        ) from exc
    return app


def _confirm(ctx: click.Context, locks: Sequence[HeldLock], yes: bool) -> None:
    """Show what is about to be released, and ask unless ``yes``."""
    ctx.obj.echo(lock_table(locks))
    if not yes:
        click.confirm(
            f"Force-release {len(locks)} lock(s)? Their holders, if still running, are no longer protected.",
            abort=True,
        )


def _echo_released(ctx: click.Context, released: Released) -> None:
    for key, holder in released.removed.items():
        ctx.obj.echo(f"released {key!r}: token {holder.get('token', '?')}, held by {_holder(holder)}")
    for handoff in released.handoffs:
        ctx.obj.echo(f"handed on parked message {handoff.ticket} of {handoff.key!r}")


def _echo_checks(ctx: click.Context, checks: Sequence[Check]) -> None:
    """One line per check, its verdict coloured, then the totals."""
    for check in checks:
        label = ctx.obj.style(f"{check.verdict.value:<4}", fg=_VERDICT_COLOURS[check.verdict], bold=True)
        subject = f"{check.subject}: " if check.subject else ""
        ctx.obj.echo(f"{label}  {check.name:<11}  {subject}{check.detail}")
    counts = {verdict: sum(1 for check in checks if check.verdict is verdict) for verdict in Verdict}
    ctx.obj.echo(f"{counts[Verdict.OK]} ok, {counts[Verdict.WARN]} warning(s), {counts[Verdict.FAIL]} failure(s)")


def _holder(holder: dict[str, Any]) -> str:
    if "handoff" in holder:
        return f"a reservation for parked ticket {holder['handoff']}"
    who = holder.get("label") or "an untagged holder"
    return f"{who} on {holder.get('hostname', '?')} pid {holder.get('pid', '?')}"


def _echo_json(ctx: click.Context, data: Any) -> None:
    ctx.obj.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
