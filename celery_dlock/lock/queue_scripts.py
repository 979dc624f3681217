"""The Lua scripts of the per-key handoff queue (see :mod:`~celery_dlock.lock.handoff`).

Each has one typed wrapper, as in :mod:`~celery_dlock.lock.scripts`.
"""

from __future__ import annotations

from typing import Any, Final

from .keyspace import Keyspace
from .script import (
    Granted,
    HandedOff,
    Held,
    KeyFree,
    NotOurs,
    Parked,
    QueueFilled,
    Released,
    Script,
    TicketSpent,
    reply_status,
    reply_text,
)
from .scripts import LOCK_VALUE, NEXT_TOKEN, parse_acquire

__all__ = [
    "ACQUIRE_QUEUED",
    "ALL",
    "PARK",
    "RELEASE_HANDOFF",
    "RELEASE_PREFIX_HANDOFF",
    "SWEEP",
    "acquire_queued_call",
    "park_call",
    "parse_acquire_queued",
    "parse_park",
    "parse_release_handoff",
    "parse_sweep",
    "release_handoff_call",
    "release_prefix_handoff_call",
    "sweep_call",
]

# -- handoff queues ---------------------------------------------------------------------
#
# Every script below takes the lock, its queue, its parked payloads and the
# set of keys with a queue as its first four keys.  hand_off() ends a turn:
# it reserves the lock for the oldest parked ticket (the owner RESERVED ..
# ticket, which only that ticket can take) or deletes the lock when none is
# parked, skipping tickets whose payload is gone.

_QUEUE_KEYS: Final = ("lock", "queue", "parked", "queues")

_HAND_OFF = (
    LOCK_VALUE
    + """
local function hand_off(reserve_ms, key, channel)
    while true do
        local head = redis.call('LINDEX', queue, 0)
        if not head then
            redis.call('DEL', lock)
            redis.call('SREM', queues, key)
            redis.call('PUBLISH', channel, '')
            return {'released'}
        end
        local payload = redis.call('HGET', parked, head)
        if payload then
            redis.call('SET', lock, lock_value(RESERVED .. head, 0, cjson.encode({handoff = head})), 'PX', reserve_ms)
            return {'handed-off', head, payload}
        end
        redis.call('LPOP', queue)
    end
end
"""
)


def _queue_keys(space: Keyspace, key: str) -> list[str]:
    return [space.lock(key), space.queue(key), space.parked(key), space.queues(key)]


def parse_release_handoff(reply: Any) -> Released | NotOurs | None:
    """What :data:`RELEASE_HANDOFF` or :data:`RELEASE_PREFIX_HANDOFF` answered."""
    status = reply_status(reply)
    if status == b"released":
        return Released()
    if status == b"handed-off":
        return Released(reply_text(reply[1]), reply[2])
    if status == b"not-ours":
        return NotOurs()
    return None


#: Release the owner's lock and hand the key to the oldest parked ticket.
RELEASE_HANDOFF: Final = Script(
    "release_handoff",
    keys=_QUEUE_KEYS,
    args=("owner", "channel", "reserve_ms", "key"),
    body=_HAND_OFF
    + """
if not owns(redis.call('GET', lock), owner) then
    return {'not-ours'}
end
return hand_off(reserve_ms, key, channel)
""",
)


def release_handoff_call(space: Keyspace, key: str, *, owner: str, reserve_ms: int) -> bytes:
    """Pack :data:`RELEASE_HANDOFF`."""
    return RELEASE_HANDOFF.call(_queue_keys(space, key), [owner, space.released(key), reserve_ms, key])


#: As :data:`RELEASE_HANDOFF` for an owner value starting with ``prefix``:
#: the worker's main process frees a dead pool process's lock this way.
RELEASE_PREFIX_HANDOFF: Final = Script(
    "release_prefix_handoff",
    keys=_QUEUE_KEYS,
    args=("prefix", "channel", "reserve_ms", "key"),
    body=_HAND_OFF
    + """
local value = redis.call('GET', lock)
if not value or string.sub(value, 1, #prefix) ~= prefix then
    return {'not-ours'}
end
return hand_off(reserve_ms, key, channel)
""",
)


def release_prefix_handoff_call(space: Keyspace, key: str, *, prefix: str, reserve_ms: int) -> bytes:
    """Pack :data:`RELEASE_PREFIX_HANDOFF`."""
    return RELEASE_PREFIX_HANDOFF.call(_queue_keys(space, key), [prefix, space.released(key), reserve_ms, key])


#: Hand off a queue whose lock is gone (its holder died, or a reservation
#: ran out).
SWEEP: Final = Script(
    "sweep",
    keys=_QUEUE_KEYS,
    args=("reserve_ms", "key", "channel"),
    body=_HAND_OFF
    + """
if redis.call('EXISTS', lock) == 1 then
    return {'key-free'}
end
local outcome = hand_off(reserve_ms, key, channel)
if outcome[1] == 'released' then
    return {'key-free'}
end
return outcome
""",
)


def sweep_call(space: Keyspace, key: str, *, reserve_ms: int) -> bytes:
    """Pack :data:`SWEEP`."""
    return SWEEP.call(_queue_keys(space, key), [reserve_ms, key, space.released(key)])


def parse_sweep(reply: Any) -> HandedOff | KeyFree | None:
    """What :data:`SWEEP` answered: a handoff to publish, or nothing to do."""
    status = reply_status(reply)
    if status == b"handed-off":
        return HandedOff(reply_text(reply[1]), reply[2])
    if status == b"key-free":
        return KeyFree()
    return None


#: Park a payload behind the holder; with ``coalesce`` = '1', fold it into
#: the newest entry not yet handed off.
PARK: Final = Script(
    "park",
    keys=_QUEUE_KEYS,
    args=("ticket", "payload", "max_queued", "key", "coalesce"),
    body=LOCK_VALUE
    + """
local value = redis.call('GET', lock)
if not value then
    return {'key-free'}
end
local holder = owner_of(value)
if redis.call('HEXISTS', parked, ticket) == 1 then
    return {'parked', ticket}
end
if coalesce == '1' then
    local tail = redis.call('LINDEX', queue, -1)
    if tail and holder ~= RESERVED .. tail and redis.call('HEXISTS', parked, tail) == 1 then
        redis.call('HSET', parked, tail, payload)
        return {'parked', tail}
    end
end
if redis.call('LLEN', queue) >= tonumber(max_queued) then
    return {'queue-full'}
end
redis.call('RPUSH', queue, ticket)
redis.call('HSET', parked, ticket, payload)
redis.call('SADD', queues, key)
return {'parked', ticket}
""",
)


def park_call(space: Keyspace, key: str, *, ticket: str, payload: bytes, max_queued: int, coalesce: bool) -> bytes:
    """Pack :data:`PARK`."""
    return PARK.call(_queue_keys(space, key), [ticket, payload, max_queued, key, "1" if coalesce else "0"])


def parse_park(reply: Any) -> Parked | KeyFree | QueueFilled | None:
    """What :data:`PARK` answered."""
    status = reply_status(reply)
    if status == b"parked":
        return Parked(reply_text(reply[1]))
    if status == b"key-free":
        return KeyFree()
    if status == b"queue-full":
        return QueueFilled()
    return None


#: Acquire a key that has a handoff queue, claiming ``ticket`` if not empty.
ACQUIRE_QUEUED: Final = Script(
    "acquire_queued",
    keys=(*_QUEUE_KEYS, "fence"),
    args=("owner", "lease_ms", "meta", "ticket", "reserve_ms", "key", "channel", "floor"),
    body=_HAND_OFF
    + NEXT_TOKEN
    + """
local function grant()
    local token = next_token()
    redis.call('SET', lock, lock_value(owner, token, meta), 'PX', lease_ms)
    return {'granted', token}
end
local value = redis.call('GET', lock)
local holder = value and owner_of(value)
if holder == owner then
    redis.call('PEXPIRE', lock, lease_ms)
    return {'granted', (fields_of(value))}
end
if ticket ~= '' then
    if redis.call('HEXISTS', parked, ticket) == 0 then
        return {'ticket-spent'}
    end
    if holder and holder ~= RESERVED .. ticket then
        return held_by(value)
    end
    redis.call('LREM', queue, 1, ticket)
    redis.call('HDEL', parked, ticket)
    if redis.call('LLEN', queue) == 0 then
        redis.call('SREM', queues, key)
    end
    return grant()
end
if holder then
    return held_by(value)
end
if redis.call('LLEN', queue) > 0 then
    local outcome = hand_off(reserve_ms, key, channel)
    if outcome[1] == 'handed-off' then
        return outcome
    end
end
return grant()
""",
)


def acquire_queued_call(
    space: Keyspace,
    key: str,
    *,
    owner: str,
    lease_ms: int,
    meta: str,
    ticket: str | None,
    reserve_ms: int,
    floor: int,
) -> bytes:
    """Pack :data:`ACQUIRE_QUEUED`; ``floor`` is the least token it may grant."""
    return ACQUIRE_QUEUED.call(
        [*_queue_keys(space, key), space.fence(key)],
        [owner, lease_ms, meta, ticket or "", reserve_ms, key, space.released(key), floor],
    )


def parse_acquire_queued(reply: Any) -> Granted | Held | TicketSpent | HandedOff | None:
    """What :data:`ACQUIRE_QUEUED` answered.

    :class:`HandedOff` means the key was free but tickets were stranded: it is
    now reserved for the oldest, which the caller must publish.
    """
    status = reply_status(reply)
    if status == b"ticket-spent":
        return TicketSpent()
    if status == b"handed-off":
        return HandedOff(reply_text(reply[1]), reply[2])
    return parse_acquire(reply)


#: Every handoff-queue script.
ALL: Final = (RELEASE_HANDOFF, RELEASE_PREFIX_HANDOFF, SWEEP, PARK, ACQUIRE_QUEUED)
