"""A lock holder: the client side of the fault-injection suite.

Run as a process (``python fault_holder.py '<json spec>'``), it enters the
critical section on one key ``rounds`` times, or until the recorder's ``stop``
flag is set.  The tests also call :func:`run_section` in-process for a second
holder whose steps they order by hand.

Every critical section does the same thing, recorded on the *recorder*, a
redis-server apart from the lock nodes that no fault ever touches:

1. acquire the lock (``requested`` is taken before the call, ``enter`` after);
2. push an ``entered`` line, so a holder killed inside still leaves a trace;
3. present the token to the fenced resource (:class:`FencedResource`);
4. read the unfenced counter and the fenced value;
5. sleep ``hold`` seconds (the window that pauses and faults aim at), or wait
   for the test's gate;
6. write the counter back plus one, unfenced, logging the write in the same
   ``MULTI``; then write the fenced value plus one, with the token;
7. push a ``sections`` line with ``(key, token, enter, exit)`` and the
   outcomes, then release.

All holders of one run use one key: the counter and the fenced resource
belong to the run, not to a key.  The holder never checks ``lock.lost``
before writing: it stands for a client that trusts its lock, so that the
faults which break exclusion show up as overlaps and lost updates on the
unfenced counter, while the fenced resource shows what fencing saves.  All times are ``time.monotonic_ns()``, one clock
for every process on the machine.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from celery_dlock import DLockError, Lock, LockBusy, LockUnavailable, Redlock

# -- recorder keys ----------------------------------------------------------------

#: JSON lines, one per section entered (written right after the acquire).
ENTERED = "entered"
#: JSON lines, one per section completed.
SECTIONS = "sections"
#: JSON lines for what happened outside sections (busy, unavailable, errors).
EVENTS = "events"
#: The unfenced read-modify-write counter.
COUNTER = "counter"
#: JSON lines, one per unfenced counter write, logged in the write's MULTI.
WRITES = "writes"
#: The fenced resource: a hash with ``top`` (highest token presented),
#: ``owner`` (the section that presented it) and ``value``.
FENCED = "fenced"
#: JSON lines, one per operation on the fenced resource, logged by its Lua.
FENCED_LOG = "fenced:log"
#: Set by the test to make holders stop after their current section.
STOP = "stop"
#: JSON lines, one per Celery task body run (:mod:`fault_app`).
RUNS = "runs"


def inside_flag(holder: str) -> str:
    """Set by a gated holder once it has read, to the section's number."""
    return f"inside:{holder}"


def gate_flag(holder: str) -> str:
    """Set by the test to let a gated holder write."""
    return f"gate:{holder}"


# -- the fenced resource ------------------------------------------------------------

# KEYS[1] the resource hash, KEYS[2] its log
# ARGV[1] 'claim' or 'write', ARGV[2] the token, ARGV[3] the value (writes),
# ARGV[4] the section id (holder#n)
# A claim is accepted only when its token is higher than any token seen
# before; a write only when no higher token has been presented since its own
# claim.  Every operation, accepted or not, is logged in order.
_FENCED_OP = """
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local token = tonumber(ARGV[2])
local ok = 0
if ARGV[1] == 'claim' then
    if token > top then
        redis.call('HSET', KEYS[1], 'top', token, 'owner', ARGV[4])
        ok = 1
    end
elseif token == top and owner == ARGV[4] then
    redis.call('HSET', KEYS[1], 'value', ARGV[3])
    ok = 1
end
redis.call('RPUSH', KEYS[2], cjson.encode({op = ARGV[1], token = token, value = ARGV[3], section = ARGV[4],
    ok = ok, top = top}))
return ok
"""


class FencedResource:
    """A store that takes writes only from the newest token it has seen.

    It lives on the recorder, a node apart from the lock quorum, and is
    changed only by one Lua check-and-set.  A holder *claims* it with its
    token when it enters (accepted when the token is higher than any seen
    before) and *writes* with the same token when it leaves (accepted when no
    higher token has been presented in between).  Claiming first is what
    stops a stale holder that resumes between a newer holder's read and write:
    a single fenced write at the end would be accepted there, and the newer
    holder's write, based on the same read, would lose it.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_FENCED_OP)

    def claim(self, token: int, section: str) -> bool:
        """Present ``token``; True if it is the highest seen so far."""
        return bool(self._script(keys=[FENCED, FENCED_LOG], args=["claim", token, "", section]))

    def write(self, token: int, value: int, section: str) -> bool:
        """Store ``value`` under ``token``; True if no higher token came since the claim."""
        return bool(self._script(keys=[FENCED, FENCED_LOG], args=["write", token, value, section]))


# -- one holder ----------------------------------------------------------------------


@dataclass
class HolderSpec:
    """What one holder does; JSON on the command line of a holder process."""

    nodes: list[str]
    recorder: str
    key: str = "shared"
    holder: str = "h0"
    rounds: int = 1_000_000
    hold: float = 0.01
    #: Each hold is ``hold`` times a factor drawn from ``1 ± hold_jitter``.
    hold_jitter: float = 0.5
    ttl: float = 2.0
    auto_extend: bool = True
    retry_delay: float = 0.02
    retry_jitter: float = 0.02
    socket_timeout: float = 0.2
    acquire_timeout: float = 1.0
    #: Wait for :func:`gate_flag` after reading (for tests that order steps).
    gate: bool = False
    gate_timeout: float = 30.0
    seed: int = 0
    #: How many holders the key admits: above 1, a semaphore's permits.
    limit: int = 1
    redlock_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The spec as one JSON argument."""
        return json.dumps(asdict(self))

    def redlock(self) -> Redlock:
        """The lock manager this holder uses."""
        return Redlock(
            self.nodes,
            retry_delay=self.retry_delay,
            retry_jitter=self.retry_jitter,
            socket_timeout=self.socket_timeout,
            **self.redlock_options,
        )


class Holder:
    """A holder's connections: its lock manager, the recorder, the fenced resource."""

    def __init__(self, spec: HolderSpec) -> None:
        self.spec = spec
        self.redlock = spec.redlock()
        self.recorder = redis.Redis.from_url(spec.recorder, socket_timeout=10, socket_connect_timeout=10)
        self.fenced = FencedResource(self.recorder)
        self.random = random.Random(spec.seed)
        self.done = 0

    def event(self, kind: str, **fields: Any) -> None:
        """Record something that happened outside a section."""
        line = {"holder": self.spec.holder, "kind": kind, "t": time.monotonic_ns(), "pid": os.getpid(), **fields}
        self.recorder.rpush(EVENTS, json.dumps(line))

    def stopped(self) -> bool:
        """Whether the test asked the holders to stop."""
        return bool(self.recorder.exists(STOP))

    def run(self) -> int:
        """Enter the section up to ``rounds`` times, until stopped; returns how many completed."""
        for n in range(self.spec.rounds):
            if self.stopped():
                break
            run_section(self, n)
        return self.done


def run_section(holder: Holder, n: int) -> dict[str, Any] | None:
    """One critical section, recorded; returns its record, or None if not entered."""
    spec = holder.spec
    requested = time.monotonic_ns()
    try:
        lock = holder.redlock.acquire(
            spec.key, spec.ttl, timeout=spec.acquire_timeout, auto_extend=spec.auto_extend, limit=spec.limit
        )
    except LockBusy as busy:
        holder.event("busy", requested=requested, attempts=busy.attempts)
        return None
    except LockUnavailable as down:
        errors = [f"{node}: {err!r}" for node, err in down.errors]
        holder.event("unavailable", requested=requested, attempts=down.attempts, errors=errors)
        time.sleep(spec.retry_delay)
        return None
    enter = time.monotonic_ns()
    return record_section(holder, spec.key, spec.holder, n, lock, requested, enter)


def record_section(
    holder: Holder,
    key: str,
    name: str,
    n: int | str,
    lock: Lock,
    requested: int,
    enter: int,
    *,
    release: bool = True,
) -> dict[str, Any]:
    """The body of a section held with ``lock``, recorded as section ``name#n``.

    The lock is released at the end unless ``release`` is false (a Celery task
    body leaves that to the plugin).
    """
    spec = holder.spec
    rec = holder.recorder
    section = f"{name}#{n}"
    rec.rpush(
        ENTERED,
        json.dumps(
            {"section": section, "holder": name, "key": key, "token": lock.token,
             "requested": requested, "enter": enter, "pid": os.getpid()}
        ),
    )  # fmt: skip
    claimed = holder.fenced.claim(lock.token, section)
    read = int(rec.get(COUNTER) or 0)
    fenced_read = int(rec.hget(FENCED, "value") or 0)
    if spec.gate:
        rec.set(inside_flag(name), n)
        deadline = time.monotonic() + spec.gate_timeout
        while not rec.exists(gate_flag(name)) and time.monotonic() < deadline:
            time.sleep(0.005)
        rec.delete(gate_flag(name))
    else:
        time.sleep(spec.hold * holder.random.uniform(1 - spec.hold_jitter, 1 + spec.hold_jitter))
    write_line = json.dumps({"section": section, "token": lock.token, "read": read, "t": time.monotonic_ns()})
    with rec.pipeline(transaction=True) as pipe:
        pipe.set(COUNTER, read + 1).rpush(WRITES, write_line).execute()
    wrote = holder.fenced.write(lock.token, fenced_read + 1, section) if claimed else None
    leave = time.monotonic_ns()
    record = {
        "section": section, "holder": name, "key": key, "token": lock.token, "pid": os.getpid(),
        "requested": requested, "enter": enter, "exit": leave, "read": read, "fenced_read": fenced_read,
        "claimed": claimed, "wrote": wrote, "lost": lock.lost,
    }  # fmt: skip
    rec.rpush(SECTIONS, json.dumps(record))
    if release:
        try:
            record["released"] = lock.release()
        except DLockError as exc:  # release never raises for node errors; anything else is a finding
            holder.event("release-error", error=repr(exc))
    holder.done += 1
    return record


def main(argv: list[str]) -> int:
    """Entry point of a holder process."""
    spec = HolderSpec(**json.loads(argv[1]))
    holder = Holder(spec)
    holder.event("started", faults=os.environ.get("DLOCK_FAULT_POINTS", ""))
    done = holder.run()
    holder.event("finished", done=done)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
