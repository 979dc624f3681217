"""Per-task single-flight options, checked when the task is decorated.

An option left as ``None`` takes the app's ``dlock_*`` setting, resolved the
first time the task runs in a process (see :meth:`SingleFlightOptions.resolve`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any, Final

from ..lock.errors import ConfigurationError
from .keys import KeyTemplate
from .settings import Settings, checked

__all__ = ["Policy", "SingleFlightOptions"]


@dataclass(frozen=True)
class SingleFlightOptions:
    """What a task asked for; ``None`` means "use the app setting"."""

    #: ``None`` (hash of the arguments), a template such as
    #: ``"ledger:{account_id}"``, or a callable returning the key.
    key: KeyTemplate = None
    #: Lease in seconds (``dlock_default_ttl``); renewed while the body runs.
    ttl: float | None = None
    #: How many runs of one key may hold it at once (``dlock_default_limit``):
    #: above 1, each run holds one of the key's semaphore permits.
    limit: int | None = None
    #: ``requeue``, ``skip``, ``wait``, ``raise``, ``queue`` or ``coalesce``
    #: (``dlock_on_busy``).
    on_busy: str | None = None
    #: Requeues allowed for one message (``dlock_max_requeues``).
    max_requeues: int | None = None
    #: First requeue countdown in seconds (``dlock_requeue_delay``).
    requeue_delay: float | None = None
    #: Longest requeue countdown in seconds (``dlock_requeue_max_delay``).
    requeue_max_delay: float | None = None
    #: How long ``wait`` blocks (``dlock_wait_timeout``).
    wait_timeout: float | None = None
    #: Where ``wait`` goes after ``wait_timeout`` (``dlock_wait_fallback``).
    wait_fallback: str | None = None
    #: ``closed`` or ``open`` when Redis is unreachable (``dlock_fail_mode``).
    fail_mode: str | None = None
    #: Stop renewing after this many seconds held; ``None`` renews until the end.
    max_hold: float | None = None
    #: Messages one key's queue may hold (``dlock_max_queued``).
    max_queued: int | None = None
    #: ``requeue`` or ``reject`` when the queue is full (``dlock_queue_full``).
    queue_full: str | None = None
    #: Keep the lock after the body succeeds: ``True`` until the ttl runs
    #: out, or a period in seconds (or a timedelta) to the end of the current
    #: slot of that length.  Duplicates of one run then run once; with no
    #: ``on_busy`` given they are skipped.
    hold: float | bool | timedelta | None = None
    #: How long the lock lasts: ``run`` (while the body runs), ``queue`` (from
    #: publish until the body starts), ``queue+run`` (both, as two locks) or
    #: ``life`` (from publish until the body ends) (``dlock_scope``).
    scope: str | None = None
    #: What a publish gets when the publish-time lock is held: ``return``,
    #: ``raise``, ``replace`` or ``drop`` (``dlock_on_duplicate``).
    on_duplicate: str | None = None
    #: The publish-time lock's lease beyond the countdown or eta, in seconds
    #: (``dlock_queue_ttl``).
    queue_ttl: float | None = None
    #: Keep a done-marker per task id after a success, so that a redelivered
    #: copy of a task that already succeeded is acked and not run again
    #: (``dlock_dedupe_completed``).
    dedupe_completed: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.hold, timedelta):
            object.__setattr__(self, "hold", self.hold.total_seconds())
        if self.hold is not None and self.hold is not True:
            checked("hold", self.hold)
        for name in _CHECKED:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, checked(name, value))
        self._check_scope()
        _check_limit(self.limit, self.on_busy, "on_busy")

    def _check_scope(self) -> None:
        """Refuse options that the chosen scope would silently ignore."""
        ignored, why = _IGNORED_BY_SCOPE.get(self.scope or "", ((), ""))
        for name in ignored:
            if getattr(self, name) is not None:
                raise ConfigurationError(f"{name}: {why}")

    @classmethod
    def coerce(cls, value: Any, *, task_name: str) -> SingleFlightOptions:
        """Accept options, a mapping of them, or ``True`` for all defaults."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise TypeError(
                f"single_flight: expected a dict of options for task {task_name!r}, got {type(value).__name__}"
            )
        known = {field.name for field in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise TypeError(
                f"single_flight: unknown option(s) {', '.join(sorted(unknown))} for task "
                f"{task_name!r}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"task {task_name!r}: {exc}") from None

    def resolve(self, settings: Settings) -> Policy:
        """Fill every unset option from the app's settings."""

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return getattr(settings, name) if value is None else value

        on_busy = self.on_busy or ("skip" if self.hold else settings.on_busy)
        limit = self.limit if self.limit is not None else settings.default_limit
        _check_limit(limit, on_busy, "on_busy" if self.on_busy else "dlock_on_busy")
        policy = Policy(
            ttl=self.ttl if self.ttl is not None else settings.default_ttl,
            on_busy=on_busy,
            limit=limit,
            max_requeues=pick("max_requeues"),
            requeue_delay=pick("requeue_delay"),
            requeue_max_delay=pick("requeue_max_delay"),
            wait_timeout=pick("wait_timeout"),
            wait_fallback=pick("wait_fallback"),
            fail_mode=pick("fail_mode"),
            max_hold=self.max_hold,
            max_queued=pick("max_queued"),
            queue_full=pick("queue_full"),
            hold=self.hold,  # type: ignore[arg-type]  # a timedelta became seconds in __post_init__
            scope=pick("scope"),
            on_duplicate=pick("on_duplicate"),
            queue_ttl=pick("queue_ttl"),
            dedupe_completed=pick("dedupe_completed"),
            dedupe_ttl=settings.dedupe_ttl,
        )
        if policy.requeue_max_delay < policy.requeue_delay:
            policy = replace(policy, requeue_max_delay=policy.requeue_delay)
        return policy


@dataclass(frozen=True)
class Policy:
    """The options in force for a task in one app: nothing left unset."""

    ttl: float
    on_busy: str
    max_requeues: int
    requeue_delay: float
    requeue_max_delay: float
    wait_timeout: float
    wait_fallback: str
    fail_mode: str
    max_hold: float | None
    max_queued: int
    queue_full: str
    hold: float | bool | None = None
    scope: str = "run"
    on_duplicate: str = "return"
    queue_ttl: float = 3600.0
    dedupe_completed: bool = False
    dedupe_ttl: float = 7200.0
    limit: int = 1

    @property
    def queues(self) -> bool:
        """Whether duplicates park in the key's handoff queue."""
        return self.run_lock and self.on_busy in ("queue", "coalesce")

    @property
    def publish_lock(self) -> bool:
        """Whether a publish takes the key's queue lock (every scope but ``run``)."""
        return self.scope != "run"

    @property
    def run_lock(self) -> bool:
        """Whether the body runs holding the key's run lock (every scope but ``queue``)."""
        return self.scope != "queue"


def _check_limit(limit: int | None, on_busy: str | None, on_busy_name: str) -> None:
    """Refuse a FIFO handoff queue for a key that admits several runs: it hands the key to one at a time."""
    if limit is not None and limit > 1 and on_busy in ("queue", "coalesce"):
        raise ConfigurationError(
            f"limit={limit} cannot be combined with {on_busy_name}={on_busy!r}: the handoff queue passes a key "
            "to one parked message at a time; use on_busy='requeue', 'wait', 'skip' or 'raise' with a limit"
        )


#: The options checked as the settings of the same name are.
_CHECKED: Final = (
    "ttl",
    "limit",
    "on_busy",
    "max_requeues",
    "requeue_delay",
    "requeue_max_delay",
    "wait_timeout",
    "wait_fallback",
    "fail_mode",
    "max_hold",
    "max_queued",
    "queue_full",
    "scope",
    "on_duplicate",
    "queue_ttl",
    "dedupe_completed",
)

#: The options of the lock held while the body runs, which ``scope="queue"`` does not take.
_RUN_LOCK_OPTIONS: Final = (
    "limit",
    "on_busy",
    "max_requeues",
    "requeue_delay",
    "requeue_max_delay",
    "wait_timeout",
    "wait_fallback",
    "max_hold",
    "max_queued",
    "queue_full",
    "hold",
    "dedupe_completed",
)

#: The options each scope has no use for, and why, for the error that refuses them.
_IGNORED_BY_SCOPE: Final = {
    "queue": (
        _RUN_LOCK_OPTIONS,
        "scope='queue' takes no lock while the body runs; use scope='queue+run' or 'life' for a run lock as well",
    ),
    "run": (
        ("on_duplicate", "queue_ttl"),
        "applies to a publish-time lock, which scope='run' does not take; use scope='queue', 'queue+run' or 'life'",
    ),
}
