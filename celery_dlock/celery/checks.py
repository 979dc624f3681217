"""The rules a single-flight task's settings must meet, shared by the worker and ``doctor``.

:func:`task_problems` is the one statement of them: the worker refuses to
start on a fatal one (see :mod:`celery_dlock.celery.signals`), and
``celery dlock doctor`` reports each as FAIL or WARN.
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import Policy
from .settings import Settings

__all__ = ["Problem", "lease", "task_problems"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a task's settings."""

    #: Whether the worker refuses to start on it (``doctor`` FAILs); else a warning.
    fatal: bool
    text: str


def lease(policy: Policy) -> float:
    """The longest a run's lock can stand after it died: its ttl, or its hold period."""
    hold = policy.hold
    if isinstance(hold, (int, float)) and not isinstance(hold, bool):
        return max(policy.ttl, float(hold))
    return policy.ttl


def task_problems(policy: Policy, settings: Settings, visibility: float | None) -> list[Problem]:
    """What is wrong with one task's ``policy`` on these nodes and this broker.

    ``visibility`` is the Redis broker's visibility timeout, or ``None``.
    """
    problems = []
    nodes = len(settings.redis_url)
    if policy.queues and nodes != 1:
        problems.append(
            Problem(
                True,
                f"on_busy={policy.on_busy!r} keeps its queue on one Redis node, but dlock_redis_url lists {nodes}",
            )
        )
    if visibility is not None and policy.publish_lock and policy.queue_ttl < visibility:
        problems.append(
            Problem(
                False,
                f"queue_ttl={policy.queue_ttl:g}s is shorter than the Redis broker's visibility_timeout="
                f"{visibility:g}s: a message restored after its worker died may find its queue lock gone "
                "and a duplicate queued beside it; raise dlock_queue_ttl",
            )
        )
    if visibility is not None and policy.requeue_max_delay >= visibility:
        problems.append(
            Problem(
                True,
                f"requeue_max_delay={policy.requeue_max_delay:g}s reaches the Redis broker's "
                f"visibility_timeout={visibility:g}s, so a requeued message would be delivered twice; "
                "lower dlock_requeue_max_delay or raise broker_transport_options['visibility_timeout']",
            )
        )
    elif visibility is not None and lease(policy) >= visibility:
        problems.append(
            Problem(
                False,
                "a message redelivered after a worker crash meets the dead run's lock, "
                "which stands until its lease ends, and is requeued or skipped meanwhile",
            )
        )
    return problems
