"""The exception tree of celery_dlock.

Every error raised by the package derives from :class:`DLockError`, which
carries the key it concerns.  The Celery layer adds no parallel tree: it
raises these same classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "AlreadyQueued",
    "ConfigurationError",
    "DLockError",
    "LockBusy",
    "LockLost",
    "LockUnavailable",
    "TaskSkipped",
]


class DLockError(Exception):
    """Base class of every lock error; ``key`` names the lock concerned."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        #: The lock key the error is about, or ``None`` when not key-specific.
        self.key = key


_Busy = TypeVar("_Busy", bound="LockBusy")


class LockBusy(DLockError):
    """Another owner holds the key.

    Raised only when a quorum of nodes answered and too many of them were
    held by someone else; an unreachable quorum raises
    :class:`LockUnavailable` instead.  Build one with :meth:`for_key`; the
    plain constructor takes just the message, so result backends can
    rebuild the exception from its text.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        attempts: int = 1,
        holder: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, key=key)
        #: How many acquisition attempts (or requeues) were made before giving up.
        self.attempts = attempts
        #: The holder's metadata (hostname, pid, acquired_at, label), where a
        #: node returned it.
        self.holder = dict(holder) if holder else None
        #: Seconds until the holder's lease ends unless it is extended.
        self.retry_after = retry_after

    @classmethod
    def for_key(
        cls: type[_Busy],
        key: str,
        *,
        attempts: int,
        holder: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
        limit: int = 1,
    ) -> _Busy:
        """The error for ``key``, with a message naming the holder (the first of ``limit``, for a semaphore)."""
        detail = detail or f"gave up after {attempts} attempt(s)"
        if limit > 1:
            who = f", the first by {_describe_holder(holder)}" if holder else ""
            message = f"all {limit} permits of {key!r} are held{who} ({detail})"
        else:
            who = f" by {_describe_holder(holder)}" if holder else ""
            message = f"lock {key!r} is held{who} ({detail})"
        return cls(
            message,
            key=key,
            attempts=attempts,
            holder=holder,
            retry_after=retry_after,
        )


class TaskSkipped(LockBusy):
    """A task run was skipped because its key was held (``on_busy="skip"``).

    It is stored as the skipped task's result, so ``AsyncResult.get()`` raises
    it at once instead of waiting for a run that will never happen.
    """


class AlreadyQueued(LockBusy):
    """A publish found its key already taken by a copy queued or running before it.

    Raised at publish with ``on_duplicate="raise"``; :attr:`task_id` is the
    id of the copy that holds the key, so the caller can follow it.
    """

    @property
    def task_id(self) -> str | None:
        """The task id of the copy that holds the key, where its lock recorded one."""
        label = (self.holder or {}).get("label")
        return label if isinstance(label, str) else None


class LockUnavailable(DLockError):
    """A quorum of nodes could not be reached, or answered too slowly.

    ``errors`` holds what went wrong on each node that failed, in node order,
    as ``(node, exception)`` pairs.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        attempts: int = 1,
        errors: Sequence[tuple[str, BaseException]] = (),
    ) -> None:
        super().__init__(message, key=key)
        #: How many acquisition attempts were made.
        self.attempts = attempts
        #: ``(node, exception)`` for every node that failed on the last attempt.
        self.errors = list(errors)

    @classmethod
    def for_key(
        cls,
        key: str | None,
        *,
        attempts: int,
        errors: Sequence[tuple[str, BaseException]] = (),
        reason: str = "no quorum of nodes answered",
    ) -> LockUnavailable:
        """The error for ``key``, with a message listing the failed nodes."""
        detail = "; ".join(f"{node}: {type(err).__name__}: {err}" for node, err in errors)
        subject = f"lock {key!r}" if key is not None else "the lock service"
        message = f"{subject} unavailable: {reason} after {attempts} attempt(s)"
        return cls(
            f"{message} ({detail})" if detail else message,
            key=key,
            attempts=attempts,
            errors=errors,
        )


class LockLost(DLockError):
    """A lock we held is no longer ours: it expired or another owner took it."""


class ConfigurationError(DLockError, ValueError):
    """A setting or argument is invalid; the message names it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def _describe_holder(holder: Mapping[str, Any]) -> str:
    parts = [f"{name}={holder[name]}" for name in ("label", "hostname", "pid") if holder.get(name)]
    return ", ".join(parts) or "another owner"
