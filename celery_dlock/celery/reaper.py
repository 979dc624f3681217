"""Reclaiming the locks of a worker that Celery reports offline (``dlock_reclaim_offline``).

When a whole worker dies (main process and pool), nothing releases its
tasks' locks and they wait out their ttl.  Every run's owner value starts
with ``<task id>/<worker hostname>/`` (:func:`~celery_dlock.celery.guard.owner_prefix`),
so once a worker is known dead, anyone can release exactly its runs' locks
by that prefix, and nobody else's.  Knowing it is dead is the hard part.

:class:`OfflineReaper` is a consumer bootstep of every worker with the
setting on.  It listens to Celery's worker events, in the main process, and
reaps a worker only when all of these hold (docs/reclaim.md):

1. **Expiry plus a grace**: no heartbeat from it for Celery's own expiry (two
   of its heartbeat intervals) plus ``dlock_reclaim_grace``, by this
   process's monotonic clock, so no two hosts' clocks are compared; or it
   sent ``worker-offline`` with no task active (a clean shutdown).
   A ``worker-offline`` with tasks still active is a warm shutdown draining
   them, still renewing their leases: that worker is never reaped.
2. **A working event path here**: this worker's own last heartbeat came
   back through the broker within its expiry, so silence means the other
   is silent, not that this process (paused, cut off) stopped hearing.
3. **A confirmation round**: a ``ping`` through ``app.control`` to that
   hostname gets no reply within :data:`PING_TIMEOUT`.  It runs in a short
   thread, so that this worker's own event loop keeps answering pings.

A worker never heard from (say, one started with ``--without-heartbeat``)
is never reaped.  Locks are found by SCAN of the locks
(:meth:`~celery_dlock.lock.keyspace.Keyspace.lock_pattern`) on every node,
read for their owner; ``celery dlock reap`` uses the same functions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from celery import bootsteps
from celery.events.state import HEARTBEAT_EXPIRE_WINDOW
from kombu.messaging import Consumer

from ..lock.errors import DLockError
from ..lock.metadata import parse_lock
from ..lock.redlock import Redlock
from ..lock.resp import pack
from .app_state import locks_for
from .guard import owner_prefix

__all__ = [
    "PING_TIMEOUT",
    "Liveness",
    "OfflineReaper",
    "WorkerLock",
    "offline_locks",
    "release_locks",
    "silent_workers",
    "worker_locks",
]

logger = logging.getLogger(__name__)

#: Seconds a confirmation ping waits for the suspect's reply.
PING_TIMEOUT: Final = 1.0

#: Celery's rule: a worker is offline after this many heartbeat intervals without one.
EXPIRY_INTERVALS: Final = HEARTBEAT_EXPIRE_WINDOW / 100

#: Seconds between the reaper's looks at who has gone silent.
TICK: Final = 0.5

#: The random part that ends every owner value (``secrets.token_hex(16)``).
_SECRET_LENGTH: Final = 32


@dataclass(frozen=True)
class WorkerLock:
    """The lock of one task run, as its owner value names it."""

    #: The key, without the prefix.
    key: str
    #: The worker's node name (``name@host``) and the run's task id.
    hostname: str
    task_id: str
    #: The owner prefix that releases it: ``<task id>/<hostname>/``.
    prefix: str
    #: Its fencing token.
    token: int


def _run_of(key: str, owner: str, token: int) -> WorkerLock | None:
    """The task run that owns a lock, or ``None`` for any other owner (a queue lock, a beat claim...)."""
    head, secret = owner[:-_SECRET_LENGTH], owner[-_SECRET_LENGTH:]
    task_id, _, hostname = head.rstrip("/").rpartition("/")
    if len(owner) <= _SECRET_LENGTH or "@" not in hostname or head != owner_prefix(task_id, hostname):
        return None
    return WorkerLock(key, hostname, task_id, head, token) if secret.isalnum() else None


def worker_locks(redlock: Redlock, hostnames: Collection[str] | None = None) -> list[WorkerLock]:
    """The locks of task runs on every node, of the workers ``hostnames`` (by default all).

    SCAN (never KEYS) of the locks, then each one's owner.  Nodes that
    fail are skipped, as a lock lives on a quorum anyway.  Sorted by key.
    """
    space = redlock.keyspace
    found: dict[tuple[str, str], WorkerLock] = {}
    for node in redlock.nodes:
        try:
            names = node.scan(space.lock_pattern())
        except Exception as exc:  # one node down: the others still name every lock
            logger.warning("could not scan %s for locks: %s", node.name, exc)
            continue
        for name in names:
            stored = parse_lock(node.execute(pack("GET", name)))
            run = _run_of(space.key_of_lock(name), stored.owner, stored.token) if stored else None
            if run is not None and (hostnames is None or run.hostname in hostnames):
                found.setdefault((run.key, run.prefix), run)
    return sorted(found.values(), key=lambda run: (run.key, run.prefix))


def release_locks(redlock: Redlock, runs: Collection[WorkerLock]) -> list[WorkerLock]:
    """Release each lock by its run's owner prefix; the ones a quorum released.

    A key taken since by another owner is left alone: only the dead run's
    owner value starts with its prefix.
    """
    released = []
    for run in runs:
        try:
            if redlock.release_owner(run.key, run.prefix):
                released.append(run)
        except DLockError as exc:
            logger.warning("could not release %r of offline worker %s: %s", run.key, run.hostname, exc)
    return released


def silent_workers(app: Any, hostnames: Collection[str], timeout: float = PING_TIMEOUT) -> set[str]:
    """Those of ``hostnames`` that leave a ``ping`` through ``app.control`` unanswered for ``timeout`` s."""
    if not hostnames:
        return set()
    replies = app.control.ping(destination=sorted(hostnames), timeout=timeout) or []
    answered = {name for reply in replies for name in reply}
    return set(hostnames) - answered


def offline_locks(app: Any, *, grace: float, timeout: float = PING_TIMEOUT) -> list[WorkerLock]:
    """The locks of workers that leave two pings, ``grace`` seconds apart, unanswered.

    For ``celery dlock reap``, which has no history of heartbeats: the
    workers are the ones named in the lock owners, and the second ping is
    the confirmation round that a worker paused for less than ``grace``
    (a GC pause, a network blip) answers.
    """
    redlock = locks_for(app).redlock
    held = worker_locks(redlock)
    silent = silent_workers(app, {run.hostname for run in held}, timeout)
    if silent:
        time.sleep(grace)
        silent &= silent_workers(app, silent, timeout)
    return [run for run in worker_locks(redlock, silent) if run in held] if silent else []


class Liveness:
    """Who is presumed offline, from worker events, by one observer's monotonic clock.

    ``me`` is the observer's own node name: its own heartbeats, coming back
    through the broker, show that the event path works (rule 2 above).
    """

    def __init__(self, me: str, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.me, self.grace, self.clock = me, grace, clock
        #: Hostname to (when last heard, its heartbeat interval).
        self._heard: dict[str, tuple[float, float]] = {}
        self._draining: set[str] = set()
        self._offline: set[str] = set()
        self._mutex = threading.Lock()

    def event(self, event: Mapping[str, Any]) -> None:
        """Take in one worker event (``worker-online``, ``-heartbeat`` or ``-offline``)."""
        kind, hostname = event.get("type"), event.get("hostname")
        if not isinstance(hostname, str) or kind not in ("worker-online", "worker-heartbeat", "worker-offline"):
            return
        freq = float(event.get("freq") or 2.0)
        now = self.clock()
        with self._mutex:
            before = self._heard.get(hostname)
            self._heard[hostname] = (now, freq)
            self._draining.discard(hostname)
            self._offline.discard(hostname)
            if kind == "worker-offline" and hostname != self.me:
                # A warm shutdown with tasks still running keeps renewing their leases.
                (self._draining if event.get("active") else self._offline).add(hostname)
        if before is None:
            logger.info("dlock_reclaim_offline: watching worker %s (heartbeat every %gs)", hostname, freq)
        elif now - before[0] > EXPIRY_INTERVALS * before[1]:
            logger.info(
                "heard %s again after %.1fs of silence, within the grace: its locks are kept", hostname, now - before[0]
            )

    def hears_itself(self) -> bool:
        """Whether the observer's own last heartbeat came back within its expiry."""
        with self._mutex:
            heard = self._heard.get(self.me)
        return heard is not None and self.clock() - heard[0] <= EXPIRY_INTERVALS * heard[1]

    def suspects(self) -> list[str]:
        """Workers silent past expiry plus the grace, or cleanly offline; none unless :meth:`hears_itself`."""
        if not self.hears_itself():
            return []
        now = self.clock()
        with self._mutex:
            return sorted(
                hostname
                for hostname, (heard, freq) in self._heard.items()
                if hostname != self.me
                and hostname not in self._draining
                and (hostname in self._offline or now - heard > EXPIRY_INTERVALS * freq + self.grace)
            )

    def answered(self, hostname: str) -> None:
        """``hostname`` answered a ping: alive; silent again only after another expiry plus grace."""
        with self._mutex:
            _, freq = self._heard.get(hostname, (0.0, 2.0))
            self._heard[hostname] = (self.clock(), freq)
            self._offline.discard(hostname)

    def heard_since(self, hostname: str, moment: float) -> bool:
        """Whether any event came from ``hostname`` after ``moment`` (this clock)."""
        with self._mutex:
            heard = self._heard.get(hostname)
        return heard is not None and heard[0] > moment

    def forget(self, hostname: str) -> None:
        """Stop tracking a reaped worker; its next event (a restart) tracks it again."""
        with self._mutex:
            self._heard.pop(hostname, None)
            self._draining.discard(hostname)
            self._offline.discard(hostname)


class OfflineReaper(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consumer bootstep: release the locks of workers that Celery reports offline.

    On only with ``dlock_reclaim_offline``; see the module docstring for the
    three conditions a worker must meet first.
    """

    name = "celery_dlock.offline-reaper"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        settings = locks_for(c.app).settings
        self.enabled = settings.reclaim_offline
        self.app = c.app
        self.liveness = Liveness(c.hostname, settings.reclaim_grace)
        self._round: threading.Thread | None = None
        self._started = time.monotonic()
        self._warned = False
        self._timer = c.timer
        self._tref: Any = None

    def get_consumers(self, channel: Any) -> list[Consumer]:
        """A consumer of every worker event, and the timer that looks for silent workers."""
        if self._tref is not None:
            self._tref.cancel()
        receiver = self.app.events.Receiver(channel, routing_key="worker.#")
        self._tref = self._timer.call_repeatedly(TICK, self.tick)
        consumer = Consumer(
            channel, queues=[receiver.queue], on_message=self._on_message, accept=receiver.accept, no_ack=True
        )
        return [consumer]

    def stop(self, c: Any) -> None:
        """Stop looking for silent workers, and consuming events."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        super().stop(c)

    def _on_message(self, message: Any) -> None:
        payload = message.payload
        if isinstance(payload, Mapping):
            self.liveness.event(payload)

    def tick(self) -> None:
        """Start a confirmation round for the workers now suspected, unless one is running."""
        if self._round is not None and self._round.is_alive():
            return
        if not self.liveness.hears_itself():
            if not self._warned and time.monotonic() - self._started > 10 * TICK + 2 * EXPIRY_INTERVALS:
                self._warned = True
                logger.warning(
                    "dlock_reclaim_offline: this worker hears no heartbeat of its own, so it reclaims nothing "
                    "(is it started with --without-heartbeat?)"
                )
            return
        suspects = self.liveness.suspects()
        if suspects:
            self._round = threading.Thread(target=self.confirm, args=(suspects,), name="dlock-reaper", daemon=True)
            self._round.start()

    def confirm(self, suspects: list[str]) -> None:
        """Ping the suspects; reap those that stay silent and were not heard from meanwhile."""
        started = self.liveness.clock()
        logger.info("missed heartbeats from %s: pinging before reclaiming", ", ".join(suspects))
        try:
            silent = silent_workers(self.app, suspects)
        except Exception:  # the broker is away: decide nothing
            logger.warning("could not ping %s; reclaiming nothing", suspects, exc_info=True)
            return
        for hostname in sorted(set(suspects) - silent):
            logger.info("%s answered the ping: alive, its locks are kept", hostname)
            self.liveness.answered(hostname)
        for hostname in sorted(silent):
            if self.liveness.heard_since(hostname, started):
                continue
            self.reap(hostname)

    def reap(self, hostname: str) -> None:
        """Release every lock of ``hostname``'s task runs, by their owner prefix."""
        redlock = locks_for(self.app).redlock
        released = release_locks(redlock, worker_locks(redlock, {hostname}))
        self.liveness.forget(hostname)
        logger.warning(
            "reclaimed %d lock(s) of offline worker %s: %s",
            len(released),
            hostname,
            ", ".join(f"{run.key!r} (task {run.task_id}, token {run.token})" for run in released) or "none held",
        )
