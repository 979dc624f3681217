"""The ``dlock_*`` settings of a Celery app, read and checked once.

Every setting lives in ``app.conf`` under the ``dlock_`` prefix (upper case is
accepted too, as Celery accepts it for its own settings).  :meth:`Settings.from_app`
reads them all and raises :class:`~celery_dlock.lock.errors.ConfigurationError`
naming the setting when one is wrong, so a bad value stops the worker at
start-up rather than surfacing in the first task.

This module imports nothing from Celery: it reads any mapping-like ``conf``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

from ..lock.errors import ConfigurationError
from ..lock.keyspace import DEFAULT_PREFIX
from ..lock.nodes import parse_url
from ..lock.validation import check_choice, check_int, check_number, check_text

__all__ = [
    "BUSY_POLICIES",
    "CHECKS",
    "FAIL_MODES",
    "QUEUE_FULL",
    "WAIT_FALLBACKS",
    "Settings",
    "broker_visibility_timeout",
    "checked",
]

#: Checks one value, given the name to show in its error.
Check = Callable[[str, Any], Any]

#: What a task does when its key is held: see the README's policy table.
BUSY_POLICIES: Final = ("requeue", "skip", "wait", "raise", "queue", "coalesce")

#: What ``queue`` and ``coalesce`` do when the key's queue is full.
QUEUE_FULL: Final = ("requeue", "reject")

#: Where a ``wait`` that timed out goes next.
WAIT_FALLBACKS: Final = ("requeue", "skip", "raise")

#: ``closed``: never run unlocked; ``open``: run unlocked, with a warning.
FAIL_MODES: Final = ("closed", "open")

DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"


@dataclass(frozen=True)
class Settings:
    """The app-wide defaults; each task may override most of them."""

    #: One Redis URL, or several for a Redlock quorum over independent masters.
    redis_url: tuple[str, ...] = (DEFAULT_REDIS_URL,)
    #: Prepended to every Redis key and channel the plugin uses.
    key_prefix: str = DEFAULT_PREFIX
    #: The lease in seconds; the watchdog renews it while the body runs.
    default_ttl: float = 30.0
    #: What a duplicate does when the key is held.
    on_busy: str = "requeue"
    #: What happens when the lock service cannot be reached.
    fail_mode: str = "closed"
    #: How many times one message may be requeued for a busy key.
    max_requeues: int = 100
    #: The first requeue countdown in seconds; it doubles each time, jittered.
    requeue_delay: float = 1.0
    #: The longest requeue countdown in seconds.
    requeue_max_delay: float = 60.0
    #: How long ``on_busy="wait"`` blocks in the worker.
    wait_timeout: float = 10.0
    #: Where ``on_busy="wait"`` goes when ``wait_timeout`` passes.
    wait_fallback: str = "requeue"
    #: Seconds to wait for one Redis node before counting it as failed.
    socket_timeout: float = 0.25
    #: How many messages one key's handoff queue may hold.
    max_queued: int = 1000
    #: ``requeue`` or ``reject`` a message that finds its key's queue full.
    queue_full: str = "requeue"
    #: Seconds between the worker's sweeps for handoffs lost with a dead holder.
    sweep_interval: float = 5.0
    #: The most two beats' clocks may differ, in seconds, for each due run to
    #: still be published once (see :mod:`celery_dlock.beat`).
    beat_max_skew: float = 60.0

    PREFIX: ClassVar[str] = "dlock_"

    @classmethod
    def names(cls) -> list[str]:
        """Every setting's full name, such as ``dlock_redis_url``."""
        return [cls.PREFIX + field.name for field in fields(cls)]

    @classmethod
    def from_app(cls, app: Any) -> Settings:
        """Read and check the settings of a Celery app."""
        conf = app.conf
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = cls.PREFIX + field.name
            value = _lookup(conf, name)
            if value is not None:
                values[field.name] = value
        if "redis_url" not in values:
            values["redis_url"] = _fallback_url(conf)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Build settings from short names (``redis_url``...), checking each."""
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown dlock setting(s): {', '.join(sorted(unknown))}")
        settings = cls(**{name: checked(name, value, shown_as=cls.PREFIX + name) for name, value in values.items()})
        if settings.requeue_max_delay < settings.requeue_delay:
            raise ConfigurationError(
                f"dlock_requeue_max_delay ({settings.requeue_max_delay}) must be >= "
                f"dlock_requeue_delay ({settings.requeue_delay})"
            )
        return settings


def _lookup(conf: Any, name: str) -> Any:
    for candidate in (name, name.upper()):
        try:
            value = conf.get(candidate)
        except AttributeError:
            value = None
        if value is not None:
            return value
    return None


def _fallback_url(conf: Any) -> tuple[str, ...]:
    for name in ("broker_url", "result_backend"):
        url = _lookup(conf, name)
        if isinstance(url, str) and url.split("://", 1)[0] in ("redis", "rediss", "unix"):
            return (url,)
    return (DEFAULT_REDIS_URL,)


def broker_visibility_timeout(conf: Any) -> float | None:
    """The Redis broker's ``visibility_timeout``, or ``None`` for other brokers.

    A message that waits unacknowledged longer than this (a countdown, a long
    ``acks_late`` run) is delivered a second time.
    """
    url = _lookup(conf, "broker_url") or ""
    if not isinstance(url, str) or url.split("://", 1)[0] not in ("redis", "rediss", "sentinel", "socket"):
        return None
    options = _lookup(conf, "broker_transport_options") or {}
    return float(options.get("visibility_timeout", 3600))


def check_redis_url(name: str, value: Any) -> tuple[str, ...]:
    """One URL or a non-empty list of them, each ``redis://``, ``rediss://`` or ``unix://``."""
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)) or not urls:
        raise ConfigurationError(f"{name}: expected a Redis URL or a non-empty list of them, got {value!r}")
    for url in urls:
        if not isinstance(url, str) or url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ConfigurationError(f"{name}: {url!r} is not a redis://, rediss:// or unix:// URL")
        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"{name}: {exc}".replace("nodes: ", "")) from None
    return tuple(urls)


def _choice(choices: tuple[str, ...]) -> Check:
    return lambda name, value: check_choice(name, value, choices)


def _positive(name: str, value: Any) -> float:
    return check_number(name, value, minimum=0, exclusive=True)


def _seconds(name: str, value: Any) -> float:
    return check_number(name, value, minimum=0)


def _count(name: str, value: Any) -> int:
    return check_int(name, value, minimum=0)


#: One check for each setting and task option, by its short name.
CHECKS: Final[Mapping[str, Check]] = {
    "redis_url": check_redis_url,
    "key_prefix": check_text,
    "default_ttl": _positive,
    "ttl": _positive,
    "on_busy": _choice(BUSY_POLICIES),
    "fail_mode": _choice(FAIL_MODES),
    "max_requeues": _count,
    "requeue_delay": _positive,
    "requeue_max_delay": _positive,
    "wait_timeout": _positive,
    "wait_fallback": _choice(WAIT_FALLBACKS),
    "socket_timeout": _positive,
    "max_queued": _count,
    "queue_full": _choice(QUEUE_FULL),
    "sweep_interval": _positive,
    "beat_max_skew": _seconds,
    "max_hold": _positive,
    "hold": _positive,
}


def checked(name: str, value: Any, *, shown_as: str | None = None) -> Any:
    """``value`` checked as the setting or option ``name``, else a :class:`ConfigurationError`.

    The error names ``shown_as`` (by default ``name``): the full setting
    name, or the option as the decorator takes it.
    """
    try:
        return CHECKS[name](shown_as or name, value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None
