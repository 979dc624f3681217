"""What one kind of lease sends: a plain lock's scripts, or a semaphore permit's.

:class:`~celery_dlock.lock.redlock.Redlock` runs one algorithm for both; a
:class:`Scheme` picks the scripts and the quorum.  ``limit=1`` keeps the
plain lock's scripts, so a lock pays nothing for semaphores existing.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import permit_scripts, scripts
from .keyspace import Keyspace
from .quorum import Quorum

__all__ = ["Scheme"]


@dataclass(frozen=True)
class Scheme:
    """The scripts and the quorum of leases on keys admitting ``limit`` holders."""

    space: Keyspace
    #: How many holders a key admits at once; 1 is a plain lock.
    limit: int
    #: The nodes and how many of them must grant.
    quorum: Quorum

    def acquire(self, key: str, *, owner: str, lease_ms: int, meta: str, floor: int) -> bytes:
        """The packed acquisition of ``key`` for ``owner``."""
        if self.limit == 1:
            return scripts.acquire_call(self.space, key, owner=owner, lease_ms=lease_ms, meta=meta, floor=floor)
        return permit_scripts.acquire_permit_call(
            self.space, key, owner=owner, lease_ms=lease_ms, meta=meta, floor=floor, limit=self.limit
        )

    def extend(self, key: str, *, owner: str, lease_ms: int) -> bytes:
        """The packed renewal of ``owner``'s lease: 1 renewed, 0 another's, -1 missing on the node."""
        if self.limit == 1:
            return scripts.extend_call(self.space, key, owner=owner, lease_ms=lease_ms)
        return permit_scripts.extend_permit_call(self.space, key, owner=owner, lease_ms=lease_ms)

    def repair(self, key: str, *, owner: str, token: int, meta: str, lease_ms: int) -> bytes:
        """The packed restoring of ``owner``'s lease on a node that lost it, where that is still safe."""
        if self.limit == 1:
            return scripts.repair_call(self.space, key, owner=owner, token=token, meta=meta, lease_ms=lease_ms)
        return permit_scripts.repair_permit_call(
            self.space, key, owner=owner, token=token, meta=meta, lease_ms=lease_ms, limit=self.limit
        )

    def release(self, key: str, *, owner: str, notify: bool) -> bytes:
        """The packed release of ``owner``'s lease; ``notify=False`` wakes no waiter."""
        if self.limit == 1:
            return scripts.release_call(self.space, key, owner=owner, notify=notify)
        return permit_scripts.release_permit_call(self.space, key, owner=owner, notify=notify)

    def release_prefix(self, key: str, *, prefix: str) -> bytes:
        """The packed release of every lease on ``key`` whose owner starts with ``prefix``."""
        if self.limit == 1:
            return scripts.release_prefix_call(self.space, key, prefix=prefix)
        return permit_scripts.release_permit_prefix_call(self.space, key, prefix=prefix)
