"""The ``dlock_*`` settings of a Celery app, read and checked once.

Every setting lives in ``app.conf`` under the ``dlock_`` prefix (upper case is
accepted too, as Celery accepts it for its own settings).  :meth:`Settings.from_app`
reads them all and raises :class:`~celery_dlock.lock.errors.ConfigurationError`
naming the setting when one is wrong, so a bad value stops the worker at
start-up rather than surfacing in the first task.

This module imports nothing from Celery: it reads any mapping-like ``conf``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Final

from ..lock.addresses import mask_url, parse_url
from ..lock.cluster import CLUSTER_SCHEMES, is_cluster_url, parse_cluster_url
from ..lock.errors import ConfigurationError
from ..lock.keyspace import DEFAULT_PREFIX
from ..lock.validation import check_choice, check_int, check_number, check_text

__all__ = [
    "BUSY_POLICIES",
    "CHECKS",
    "FAIL_MODES",
    "ON_DUPLICATE",
    "QUEUE_FULL",
    "SCOPES",
    "WAIT_FALLBACKS",
    "LockAddress",
    "Settings",
    "broker_visibility_timeout",
    "checked",
    "lock_address",
    "unknown_settings",
]

#: Checks one value, given the name to show in its error.
Check = Callable[[str, Any], Any]

#: What a task does when its key is held: see the README's policy table.
BUSY_POLICIES: Final = ("requeue", "skip", "wait", "raise", "queue", "coalesce")

#: How long a task's lock lasts: while it runs, while it waits in the broker,
#: both as two locks, or from publish to finish as one (docs/policies.md).
SCOPES: Final = ("run", "queue", "queue+run", "life")

#: What a publish gets when its key's publish-time lock is held.
ON_DUPLICATE: Final = ("return", "raise", "replace", "drop")

#: What ``queue`` and ``coalesce`` do when the key's queue is full.
QUEUE_FULL: Final = ("requeue", "reject")

#: Where a ``wait`` that timed out goes next.
WAIT_FALLBACKS: Final = ("requeue", "skip", "raise")

#: ``closed``: never run unlocked; ``open``: run unlocked, with a warning.
FAIL_MODES: Final = ("closed", "open")

#: URL schemes whose URL names exactly one Redis server, usable as a lock node.
REDIS_SCHEMES: Final = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class Settings:
    """The app-wide defaults; each task may override most of them."""

    #: One Redis URL, or several for a Redlock quorum over independent masters.
    #: Unset, it is derived from ``broker_url`` or ``result_backend`` where that
    #: is exact (see :func:`lock_address`), and refused otherwise.
    redis_url: tuple[str, ...] = ()
    #: Prepended to every Redis key and channel the plugin uses.
    key_prefix: str = DEFAULT_PREFIX
    #: The lease in seconds; the watchdog renews it while the body runs.
    default_ttl: float = 30.0
    #: How many runs of one key may hold it at once: above 1, a semaphore.
    default_limit: int = 1
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
    #: How long a task's lock lasts: ``run``, ``queue``, ``queue+run`` or ``life``.
    scope: str = "run"
    #: What a publish gets when its key's publish-time lock is held.
    on_duplicate: str = "return"
    #: The publish-time lock's lease beyond the message's countdown or eta, in
    #: seconds: the longest it outlives a message that was lost.
    queue_ttl: float = 3600.0
    #: Seconds between the worker's sweeps for handoffs lost with a dead holder.
    sweep_interval: float = 5.0
    #: The most two beats' clocks may differ, in seconds, for each due run to
    #: still be published once (see :mod:`celery_dlock.beat`).
    beat_max_skew: float = 60.0
    #: The scheduler ``celery_dlock.beat:ClaimingScheduler`` makes claim its
    #: runs, as ``"module:Class"`` (such as django-celery-beat's
    #: ``"django_celery_beat.schedulers:DatabaseScheduler"``).
    beat_scheduler: str | None = None
    #: Keep a done-marker for each task id that succeeded, so that a
    #: redelivered copy (``acks_late``) is acked and not run again.
    dedupe_completed: bool = False
    #: How long a done-marker lasts, in seconds: keep it above the broker's
    #: ``visibility_timeout``, the longest a redelivery can come after the run.
    dedupe_ttl: float = 7200.0
    #: Let each worker's main process release the locks of a worker that
    #: Celery reports offline (its heartbeats stopped), see docs/reclaim.md.
    reclaim_offline: bool = False
    #: Seconds of silence beyond Celery's own heartbeat expiry (two heartbeat
    #: intervals) before an offline worker is pinged and, if silent, reaped.
    reclaim_grace: float = 4.0
    #: The master name for ``sentinel://`` lock URLs (Celery's ``master_name``).
    sentinel_master: str | None = None
    #: Options of ``sentinel://`` lock URLs, named as in Celery's
    #: ``broker_transport_options``: ``master_name``, ``sentinel_kwargs``.
    transport_options: dict[str, Any] | None = None
    #: Record each run's lock wait and hold times as histogram counts in the
    #: shared counters, for ``celery dlock metrics`` (see ``docs/operations.md``).
    metrics: bool = False
    #: Keep this many of the latest grants, releases, losses and forced
    #: releases of each key in a capped stream, for ``celery dlock history``; 0 keeps none.
    history: int = 0

    PREFIX: ClassVar[str] = "dlock_"

    @classmethod
    def names(cls) -> list[str]:
        """Every setting's full name, such as ``dlock_redis_url``."""
        return [cls.PREFIX + field.name for field in fields(cls)]

    @classmethod
    def from_app(cls, app: Any) -> Settings:
        """Read and check the settings of a Celery app.

        Raises :class:`ConfigurationError` naming the first bad setting, and
        naming ``dlock_redis_url`` when it is unset and cannot be derived.
        """
        conf = app.conf
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = cls.PREFIX + field.name
            value = _lookup(conf, name)
            if value is not None:
                values[field.name] = value
        settings = cls.from_mapping(values)
        address = lock_address(conf)
        settings = replace(settings, redis_url=address.urls, sentinel_master=address.sentinel_master)
        if address.sentinel_kwargs:
            settings = replace(
                settings,
                transport_options={**(settings.transport_options or {}), "sentinel_kwargs": address.sentinel_kwargs},
            )
        return settings

    @property
    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options for the Sentinels of ``sentinel://`` lock URLs."""
        return dict((self.transport_options or {}).get("sentinel_kwargs") or {})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Build settings from short names (``redis_url``...), checking each.

        ``redis_url`` may be left out here; :meth:`from_app` derives it.
        """
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown dlock setting(s): {', '.join(sorted(unknown))}")
        settings = cls(**{name: checked(name, value, shown_as=cls.PREFIX + name) for name, value in values.items()})
        if settings.requeue_max_delay < settings.requeue_delay:
            raise ConfigurationError(
                f"dlock_requeue_max_delay ({settings.requeue_max_delay}) must be >= "
                f"dlock_requeue_delay ({settings.requeue_delay})"
            )
        if settings.default_limit > 1 and settings.on_busy in ("queue", "coalesce"):
            raise ConfigurationError(
                f"dlock_default_limit ({settings.default_limit}) cannot be combined with "
                f"dlock_on_busy={settings.on_busy!r}: the handoff queue passes a key to one message at a time"
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


def unknown_settings(conf: Any) -> list[tuple[str, str | None]]:
    """Each ``dlock_``-prefixed key of ``conf`` that is not a setting, with the likeliest one meant.

    Upper-case keys and a ``CELERY_`` namespace (Django's
    ``config_from_object(..., namespace="CELERY")``) are recognised too.
    """
    known = Settings.names()
    found = []
    for key in _keys(conf):
        name = key.lower()
        if name.startswith("celery_dlock_"):
            name = name[len("celery_") :]
        if name.startswith(Settings.PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            found.append((key, close[0] if close else None))
    return sorted(found)


def _keys(conf: Any) -> list[str]:
    try:
        return [key for key in conf if isinstance(key, str)]
    except (AttributeError, TypeError):
        return []


@dataclass(frozen=True)
class LockAddress:
    """Where the locks live (:func:`lock_address`)."""

    #: The lock nodes' URLs.
    urls: tuple[str, ...]
    #: The setting they came from: ``dlock_redis_url``, ``broker_url`` or ``result_backend``.
    source: str
    #: The Sentinel master name, for ``sentinel://`` URLs.
    sentinel_master: str | None = None
    #: The Sentinels' own connection options, for ``sentinel://`` URLs.
    sentinel_kwargs: dict[str, Any] | None = None


def lock_address(conf: Any) -> LockAddress:
    """Where the locks live, and the setting that says so.

    ``dlock_redis_url`` if set; else ``broker_url``, then ``result_backend``,
    where one names exactly one Redis server (``redis://``, ``rediss://`` or
    ``unix://``, with its db number) or one Sentinel-managed master
    (``sentinel://``, with ``master_name`` from the matching
    ``*_transport_options``, as Celery reads it).  Anything else is refused
    with a :class:`ConfigurationError` naming ``dlock_redis_url``, because a
    guess (say, ``localhost``) would give each host its own locks and no
    exclusion between hosts at all.
    """
    explicit = _lookup(conf, "dlock_redis_url")
    if explicit is not None:
        urls = check_redis_url("dlock_redis_url", explicit)
        options = _lookup(conf, "dlock_transport_options") or {}
        master = _lookup(conf, "dlock_sentinel_master") or options.get("master_name")
        return _with_master(LockAddress(urls, "dlock_redis_url", master), "dlock_sentinel_master")
    broker = _lookup(conf, "broker_url")
    if _exact_redis(broker) or _is_sentinel(broker):
        return _derived(conf, broker, "broker_url", "broker_transport_options")
    if broker is not None and not _is_redis_family(broker):
        backend = _lookup(conf, "result_backend")
        if _exact_redis(backend) or _is_sentinel(backend):
            return _derived(conf, backend, "result_backend", "result_backend_transport_options")
        found = f"broker_url={_masked(broker)} and result_backend={_masked(backend)}"
    elif broker is None:
        found = "broker_url is unset (Celery's default is AMQP on localhost)"
    else:
        found = f"broker_url={_masked(broker)}, which is not one Redis server's URL"
    raise ConfigurationError(
        f"dlock_redis_url is not set and cannot be derived exactly: {found}. Set dlock_redis_url to the "
        "Redis server that holds the locks, such as 'redis://redis.internal:6379/0' (a list of URLs for a "
        "quorum of independent masters); it is never guessed, since a wrong guess gives no exclusion"
    )


def _derived(conf: Any, url: str, source: str, options_name: str) -> LockAddress:
    options = _lookup(conf, options_name) or {}
    kwargs = options.get("sentinel_kwargs")
    address = LockAddress((url,), source, options.get("master_name"), dict(kwargs) if kwargs else None)
    return _with_master(address, f"{options_name}['master_name']")


def _with_master(address: LockAddress, setting: str) -> LockAddress:
    if any(_is_sentinel(url) for url in address.urls) and not address.sentinel_master:
        raise ConfigurationError(
            f"{setting} is not set: the lock URL from {address.source} names Sentinels, "
            "and they must be told which master to find (set dlock_sentinel_master)"
        )
    return address


def _is_sentinel(url: Any) -> bool:
    return isinstance(url, str) and all(part.strip().startswith("sentinel://") for part in url.split(";"))


def _exact_redis(url: Any) -> bool:
    return isinstance(url, str) and ";" not in url and url.split("://", 1)[0] in REDIS_SCHEMES


def _is_redis_family(url: Any) -> bool:
    """A Redis broker URL of a kind that does not name one server: a list, a failover, a socket."""
    if not isinstance(url, str):
        return True
    schemes = {part.split("://", 1)[0] for part in url.split(";")}
    return bool(schemes & {*REDIS_SCHEMES, "sentinel", "redis+socket", "socket"})


def _masked(url: Any) -> str:
    if not isinstance(url, str):
        return repr(url) if url is None else f"a {type(url).__name__} of URLs"
    return repr(";".join(mask_url(part) for part in url.split(";")))


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
    """One URL or a non-empty list of them: ``redis://``, ``rediss://``, ``unix://``, ``sentinel://`` or ``redis+cluster://``."""
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)) or not urls:
        raise ConfigurationError(f"{name}: expected a Redis URL or a non-empty list of them, got {value!r}")
    for url in urls:
        if _is_sentinel(url):
            continue  # parsed when the node is made, once its master name is known
        if not isinstance(url, str) or url.split("://", 1)[0] not in (*REDIS_SCHEMES, *CLUSTER_SCHEMES):
            raise ConfigurationError(
                f"{name}: {url!r} is not a redis://, rediss://, unix://, sentinel:// or redis+cluster:// URL"
            )
        try:
            parse_cluster_url(url) if is_cluster_url(url) else parse_url(url)
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


def _limit(name: str, value: Any) -> int:
    return check_int(name, value, minimum=1)


def _name(name: str, value: Any) -> str:
    if not check_text(name, value):
        raise ValueError(f"{name}: must not be empty")
    return str(value)


def _symbol(name: str, value: Any) -> str:
    module, _, attribute = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (module and attribute and all(part.isidentifier() for part in (*module.split("."), *attribute.split(".")))):
        raise ValueError(f'{name}: expected "module:Class", such as "celery.beat:PersistentScheduler", got {value!r}')
    return str(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def _options(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a dict of options, got {type(value).__name__}")
    return dict(value)


#: One check for each setting and task option, by its short name.
CHECKS: Final[Mapping[str, Check]] = {
    "redis_url": check_redis_url,
    "key_prefix": check_text,
    "default_ttl": _positive,
    "ttl": _positive,
    "default_limit": _limit,
    "limit": _limit,
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
    "scope": _choice(SCOPES),
    "on_duplicate": _choice(ON_DUPLICATE),
    "queue_ttl": _positive,
    "beat_max_skew": _seconds,
    "beat_scheduler": _symbol,
    "max_hold": _positive,
    "hold": _positive,
    "sentinel_master": _name,
    "transport_options": _options,
    "metrics": _flag,
    "history": _count,
    "dedupe_completed": _flag,
    "dedupe_ttl": _positive,
    "reclaim_offline": _flag,
    "reclaim_grace": _seconds,
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
