"""The Lua scripts of plain locks: acquire, extend, release, fencing.

Each has one typed wrapper: ``*_call`` packs a call and ``parse_*`` names
what came back, so callers never see a bare reply code.  What the keys hold
is in ``docs/architecture.md``; the handoff queue's scripts are in
:mod:`~celery_dlock.lock.queue_scripts`.  Each connection loads every script
when it connects (:data:`ALL`), so the hot path never pays a NOSCRIPT round
trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .keyspace import Keyspace
from .script import Arg, Granted, Held, Script, reply_status
from .tokens import FLOOR_SLACK

__all__ = [
    "ACQUIRE",
    "ADD_COUNTS",
    "ALL",
    "EXTEND",
    "FENCE_FLOOR",
    "FORCE_RELEASE",
    "NEXT_TOKEN",
    "RELEASE",
    "RELEASE_PREFIX",
    "REPAIR",
    "acquire_call",
    "add_counts_call",
    "done",
    "extend_call",
    "fence_floor_call",
    "fenced",
    "force_release_call",
    "missing",
    "parse_acquire",
    "refused",
    "release_call",
    "release_prefix_call",
    "repair_call",
]

# -- plain locks ------------------------------------------------------------------------

#: The next token of a key: its counter plus one, raised to the caller's
#: clock floor once it lags that by more than the slack
#: (:mod:`~celery_dlock.lock.tokens`), and stored back.
NEXT_TOKEN: Final = f"""
local function next_token()
    local token = redis.call('INCR', fence)
    if token < tonumber(floor) - {FLOOR_SLACK} then
        redis.call('SET', fence, floor)
        token = tonumber(floor)
    end
    return token
end
"""

#: Reading and writing the lock string of the script's ``lock`` key: its
#: owner, token and metadata on three lines (:mod:`~celery_dlock.lock.metadata`
#: parses it in Python), and a fourth, empty line once an acquirer has found
#: it held, so that its release wakes waiters.  ``GET`` on a value that is
#: false (no lock) is handled by each caller.
LOCK_VALUE: Final = """
local function lock_value(who, token, details)
    return who .. '\\n' .. token .. '\\n' .. details
end
local function owns(value, who)
    return value and string.sub(value, 1, #who + 1) == who .. '\\n'
end
local function owner_of(value)
    return string.sub(value, 1, string.find(value, '\\n', 1, true) - 1)
end
local function fields_of(value)
    local first = string.find(value, '\\n', 1, true)
    local second = string.find(value, '\\n', first + 1, true)
    local third = string.find(value, '\\n', second + 1, true) or 0
    return tonumber(string.sub(value, first + 1, second - 1)), string.sub(value, second + 1, third - 1)
end
local function waited(value)
    return string.byte(value, -1) == 10
end
local function held_by(value)
    if not waited(value) then
        redis.call('APPEND', lock, '\\n')
    end
    local _, details = fields_of(value)
    return {'held', details, redis.call('PTTL', lock)}
end
"""

#: Take the lock, or report who holds it and mark it as waited for, so that
#: its release wakes waiters.  Idempotent for its owner, so a retried
#: acquire is safe.  The token is drawn before ``SET NX``, so a busy
#: attempt spends one: tokens only ever need to rise.
ACQUIRE: Final = Script(
    "acquire",
    keys=("lock", "fence"),
    args=("owner", "lease_ms", "meta", "floor"),
    body=NEXT_TOKEN
    + LOCK_VALUE
    + """
local token = next_token()
if redis.call('SET', lock, lock_value(owner, token, meta), 'NX', 'PX', lease_ms) then
    return {'granted', token}
end
local value = redis.call('GET', lock)
if owns(value, owner) then
    redis.call('PEXPIRE', lock, lease_ms)
    return {'granted', (fields_of(value))}
end
return held_by(value)
""",
)


def acquire_call(space: Keyspace, key: str, *, owner: str, lease_ms: int, meta: str, floor: int) -> bytes:
    """Pack :data:`ACQUIRE`; ``floor`` is the least token it may grant (:func:`~.tokens.token_floor`)."""
    return ACQUIRE.call([space.lock(key), space.fence(key)], [owner, lease_ms, meta, floor])


def parse_acquire(reply: Any) -> Granted | Held | None:
    """What :data:`ACQUIRE` (or :data:`ACQUIRE_QUEUED`) answered; ``None`` for an error or no reply."""
    status = reply_status(reply)
    if status == b"granted":
        return Granted(int(reply[1]))
    if status == b"held":
        return Held(reply[1] or None, int(reply[2]))
    return None


#: Renew the lease if the lock is still the owner's: 1; 0 if another's; -1 if the node has none.
EXTEND: Final = Script(
    "extend",
    keys=("lock",),
    args=("owner", "lease_ms"),
    body=LOCK_VALUE
    + """
local value = redis.call('GET', lock)
if not value then
    return -1
end
if owns(value, owner) then
    redis.call('PEXPIRE', lock, lease_ms)
    return 1
end
return 0
""",
)

#: Put back a lock a node lost (a restart, a wipe, an early expiry) while a
#: quorum still holds it: only where the key is free, for the lease left.
REPAIR: Final = Script(
    "repair",
    keys=("lock",),
    args=("owner", "token", "meta", "lease_ms"),
    body=LOCK_VALUE
    + """
if redis.call('SET', lock, lock_value(owner, token, meta), 'NX', 'PX', lease_ms) then
    return 1
end
return 0
""",
)


def missing(reply: Any) -> bool:
    """Whether :data:`EXTEND` answered that the node holds no lock on the key."""
    return isinstance(reply, int) and reply == -1


def repair_call(space: Keyspace, key: str, *, owner: str, token: int, meta: str, lease_ms: int) -> bytes:
    """Pack :data:`REPAIR`."""
    return REPAIR.call([space.lock(key)], [owner, token, meta, lease_ms])


def done(reply: Any) -> bool:
    """Whether a yes-or-no script acted: the lock was the caller's (or, forced, existed)."""
    return isinstance(reply, int) and reply == 1


def refused(reply: Any) -> bool:
    """Whether a yes-or-no script answered that the lock was not the caller's."""
    return isinstance(reply, int) and reply == 0


def extend_call(space: Keyspace, key: str, *, owner: str, lease_ms: int) -> bytes:
    """Pack :data:`EXTEND`."""
    return EXTEND.call([space.lock(key)], [owner, lease_ms])


#: Delete the lock if it is the owner's, waking waiters unless ``channel``
#: is empty or no acquirer found the lock held: 1, else 0.
RELEASE: Final = Script(
    "release",
    keys=("lock",),
    args=("owner", "channel"),
    body=LOCK_VALUE
    + """
local value = redis.call('GET', lock)
if owns(value, owner) then
    redis.call('DEL', lock)
    if channel ~= '' and waited(value) then
        redis.call('PUBLISH', channel, '')
    end
    return 1
end
return 0
""",
)


def release_call(space: Keyspace, key: str, *, owner: str, notify: bool) -> bytes:
    """Pack :data:`RELEASE`; ``notify=False`` wakes no waiter."""
    channel = space.released(key) if notify else ""
    return RELEASE.call([space.lock(key)], [owner, channel])


#: Delete the lock, or a semaphore's permits, whoever holds them, waking
#: waiters: 1 if there was one.
FORCE_RELEASE: Final = Script(
    "force_release",
    keys=("lock", "permits", "holders"),
    args=("channel",),
    body="""
if redis.call('DEL', lock, permits, holders) > 0 then
    redis.call('PUBLISH', channel, '')
    return 1
end
return 0
""",
)


def force_release_call(space: Keyspace, key: str) -> bytes:
    """Pack :data:`FORCE_RELEASE`."""
    keys = [space.lock(key), space.permits(key), space.permit_holders(key)]
    return FORCE_RELEASE.call(keys, [space.released(key)])


#: Delete the lock if its owner starts with ``prefix`` (which has no newline): 1, else 0.
RELEASE_PREFIX: Final = Script(
    "release_prefix",
    keys=("lock",),
    args=("prefix", "channel"),
    body="""
local value = redis.call('GET', lock)
if value and string.sub(value, 1, #prefix) == prefix then
    redis.call('DEL', lock)
    redis.call('PUBLISH', channel, '')
    return 1
end
return 0
""",
)


def release_prefix_call(space: Keyspace, key: str, *, prefix: str) -> bytes:
    """Pack :data:`RELEASE_PREFIX`."""
    return RELEASE_PREFIX.call([space.lock(key)], [prefix, space.released(key)])


#: Raise the fencing counter of a key to at least ``floor``; returns the counter.
FENCE_FLOOR: Final = Script(
    "fence_floor",
    keys=("fence",),
    args=("floor",),
    body="""
local current = tonumber(redis.call('GET', fence) or '0')
local wanted = tonumber(floor)
if current < wanted then
    redis.call('SET', fence, wanted)
    return wanted
end
return current
""",
)


def fence_floor_call(space: Keyspace, key: str, floor: int) -> bytes:
    """Pack :data:`FENCE_FLOOR` for the counter that ``key``'s tokens come from."""
    return FENCE_FLOOR.call([space.fence(key)], [floor])


def fenced(reply: Any) -> bool:
    """Whether :data:`FENCE_FLOOR` answered with the node's counter (it is then at the floor)."""
    return isinstance(reply, int) and not isinstance(reply, bool)


#: Add to counters of the stats hash: the arguments are field, amount, field, amount...
ADD_COUNTS: Final = Script(
    "add_counts",
    keys=("stats",),
    args=(),
    body="""
for i = 1, #ARGV, 2 do
    redis.call('HINCRBY', stats, ARGV[i], ARGV[i + 1])
end
return 1
""",
)


def add_counts_call(space: Keyspace, counts: Mapping[tuple[str, str], int]) -> bytes:
    """Pack :data:`ADD_COUNTS` for ``counts`` of ``(label, event)``."""
    args: list[Arg] = []
    for (label, event), amount in counts.items():
        args += [space.stats_field(label, event), amount]
    return ADD_COUNTS.call([space.stats], args)


#: Every plain-lock script.
ALL: Final = (ACQUIRE, EXTEND, REPAIR, RELEASE, RELEASE_PREFIX, FORCE_RELEASE, FENCE_FLOOR, ADD_COUNTS)
