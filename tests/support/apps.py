"""The contract between the suite and its Celery test apps, and what the apps share.

A test tells an app (``worker_app``, ``beat_app``, ``fault_app``, run by
``celery -A`` in another process) where its broker, lock nodes and recorder
are through the variables of :func:`app_environment`; the app reads them back
with :func:`app_urls`.  Inside the worker, :class:`PerProcess` makes a client
once per pool process, since a Redis connection must not cross a fork.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "ENV_BROKER",
    "ENV_LOCKS",
    "ENV_RECORDER",
    "HOLD_SECONDS",
    "AppUrls",
    "PerProcess",
    "app_environment",
    "app_urls",
]

T = TypeVar("T")

ENV_BROKER = "DLOCK_TEST_BROKER_URL"
ENV_LOCKS = "DLOCK_TEST_LOCK_URLS"
ENV_RECORDER = "DLOCK_TEST_RECORDER_URL"

_DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

#: The period of ``policy_app``'s ``sa.hold``; here so that tests need not import
#: the app (importing a test app registers its tasks on every app of the process).
HOLD_SECONDS = 2.0


def app_environment(*, broker_url: str, lock_urls: Sequence[str], recorder_url: str, **extra: Any) -> dict[str, str]:
    """The variables that tell a test app its broker, lock nodes and recorder, plus ``extra``."""
    env = {ENV_BROKER: broker_url, ENV_LOCKS: ",".join(lock_urls), ENV_RECORDER: recorder_url}
    env.update({name: str(value) for name, value in extra.items()})
    return env


@dataclass(frozen=True)
class AppUrls:
    """Where a test app's broker (and result backend), lock nodes and recorder are."""

    broker: str
    locks: list[str]
    recorder: str


def app_urls() -> AppUrls:
    """The URLs :func:`app_environment` set; each defaults to the broker's."""
    broker = os.environ.get(ENV_BROKER, _DEFAULT_BROKER)
    locks = [url for url in os.environ.get(ENV_LOCKS, broker).split(",") if url]
    return AppUrls(broker, locks, os.environ.get(ENV_RECORDER, broker))


class PerProcess(Generic[T]):
    """A value made on first use in each process: a forked pool process makes its own."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: tuple[int, T] | None = None

    def __call__(self) -> T:
        if self._made is None or self._made[0] != os.getpid():
            self._made = (os.getpid(), self._make())
        return self._made[1]
