"""The Lua scripts of semaphores: up to ``limit`` permits on one key, per node.

A node keeps two keys per semaphore key: a sorted set of the permit owners
scored by when each lease ends on the node's own clock, and a hash from each
owner to its fencing token and metadata.  Every script first drops the
permits whose lease has ended, so no permit outlives its lease and no key is
left behind: both keys expire with their last permit.  The replies have the
shapes of the plain lock's (:mod:`~celery_dlock.lock.scripts`), so the same
parsers read them.  Why one node's count is not enough over several nodes is
in ``docs/guarantees.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .keyspace import Keyspace
from .metadata import parse_metadata
from .script import Script, reply_text
from .scripts import LOCK_VALUE, NEXT_TOKEN

__all__ = [
    "ACQUIRE_PERMIT",
    "ALL",
    "EXTEND_PERMIT",
    "LIST_PERMITS",
    "RELEASE_PERMIT",
    "RELEASE_PERMIT_PREFIX",
    "REPAIR_PERMIT",
    "StoredPermit",
    "acquire_permit_call",
    "extend_permit_call",
    "list_permits_call",
    "parse_permits",
    "quorum_permits",
    "release_permit_call",
    "release_permit_prefix_call",
    "repair_permit_call",
]

_PERMIT_KEYS: Final = ("permits", "holders")

#: The node's clock in ms, the expired permits dropped, and a helper that
#: makes both keys expire with the last permit.
_TRIM: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', permits, '-inf', now)
if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', permits, '-inf', now)
    redis.call('HDEL', holders, unpack(expired))
end
local function expire_with_last()
    local last = redis.call('ZRANGE', permits, -1, -1, 'WITHSCORES')
    if last[2] then
        local left = math.max(1, tonumber(last[2]) - now)
        redis.call('PEXPIRE', permits, left)
        redis.call('PEXPIRE', holders, left)
    end
end
"""

#: Take a permit if fewer than ``limit`` are held (and no plain lock holds
#: the key), or report the permit that ends first.  Idempotent for its owner.
ACQUIRE_PERMIT: Final = Script(
    "acquire_permit",
    keys=(*_PERMIT_KEYS, "fence", "lock"),
    args=("owner", "lease_ms", "meta", "floor", "limit"),
    body=NEXT_TOKEN
    + LOCK_VALUE
    + _TRIM
    + """
local lease = tonumber(lease_ms)
if redis.call('ZSCORE', permits, owner) then
    redis.call('ZADD', permits, now + lease, owner)
    expire_with_last()
    local entry = redis.call('HGET', holders, owner) or '0|'
    return {'granted', tonumber(string.match(entry, '^%d+'))}
end
local value = redis.call('GET', lock)
if value then
    return held_by(value)
end
if redis.call('ZCARD', permits) < tonumber(limit) then
    local token = next_token()
    redis.call('ZADD', permits, now + lease, owner)
    redis.call('HSET', holders, owner, token .. '|' .. meta)
    expire_with_last()
    return {'granted', token}
end
local first = redis.call('ZRANGE', permits, 0, 0, 'WITHSCORES')
local entry = redis.call('HGET', holders, first[1]) or '0|'
return {'held', string.match(entry, '|(.*)$'), tonumber(first[2]) - now}
""",
)


def acquire_permit_call(
    space: Keyspace, key: str, *, owner: str, lease_ms: int, meta: str, floor: int, limit: int
) -> bytes:
    """Pack :data:`ACQUIRE_PERMIT` for one of ``limit`` permits of ``key``."""
    keys = [space.permits(key), space.permit_holders(key), space.fence(key), space.lock(key)]
    return ACQUIRE_PERMIT.call(keys, [owner, lease_ms, meta, floor, limit])


#: Renew the owner's permit: 1; -1 if the node holds none for it.
EXTEND_PERMIT: Final = Script(
    "extend_permit",
    keys=_PERMIT_KEYS,
    args=("owner", "lease_ms"),
    body=_TRIM
    + """
if redis.call('ZSCORE', permits, owner) then
    redis.call('ZADD', permits, now + tonumber(lease_ms), owner)
    expire_with_last()
    return 1
end
return -1
""",
)


def extend_permit_call(space: Keyspace, key: str, *, owner: str, lease_ms: int) -> bytes:
    """Pack :data:`EXTEND_PERMIT`."""
    return EXTEND_PERMIT.call([space.permits(key), space.permit_holders(key)], [owner, lease_ms])


#: Put back a permit a node lost while a quorum still grants it, only where
#: the node has a permit to spare: 1 if put back, else 0.
REPAIR_PERMIT: Final = Script(
    "repair_permit",
    keys=_PERMIT_KEYS,
    args=("owner", "token", "meta", "lease_ms", "limit"),
    body=_TRIM
    + """
if redis.call('ZSCORE', permits, owner) or redis.call('ZCARD', permits) >= tonumber(limit) then
    return 0
end
redis.call('ZADD', permits, now + tonumber(lease_ms), owner)
redis.call('HSET', holders, owner, token .. '|' .. meta)
expire_with_last()
return 1
""",
)


def repair_permit_call(
    space: Keyspace, key: str, *, owner: str, token: int, meta: str, lease_ms: int, limit: int
) -> bytes:
    """Pack :data:`REPAIR_PERMIT`."""
    keys = [space.permits(key), space.permit_holders(key)]
    return REPAIR_PERMIT.call(keys, [owner, token, meta, lease_ms, limit])


#: Give the owner's permit back, waking waiters unless ``channel`` is empty: 1, else 0.
RELEASE_PERMIT: Final = Script(
    "release_permit",
    keys=_PERMIT_KEYS,
    args=("owner", "channel"),
    body="""
if redis.call('ZREM', permits, owner) == 1 then
    redis.call('HDEL', holders, owner)
    if channel ~= '' then
        redis.call('PUBLISH', channel, '')
    end
    return 1
end
return 0
""",
)


def release_permit_call(space: Keyspace, key: str, *, owner: str, notify: bool) -> bytes:
    """Pack :data:`RELEASE_PERMIT`; ``notify=False`` wakes no waiter."""
    channel = space.released(key) if notify else ""
    return RELEASE_PERMIT.call([space.permits(key), space.permit_holders(key)], [owner, channel])


#: Give back every permit whose owner value starts with ``prefix``: 1 if any, else 0.
RELEASE_PERMIT_PREFIX: Final = Script(
    "release_permit_prefix",
    keys=_PERMIT_KEYS,
    args=("prefix", "channel"),
    body="""
local freed = 0
for _, owner in ipairs(redis.call('ZRANGE', permits, 0, -1)) do
    if string.sub(owner, 1, string.len(prefix)) == prefix then
        redis.call('ZREM', permits, owner)
        redis.call('HDEL', holders, owner)
        freed = 1
    end
end
if freed == 1 then
    redis.call('PUBLISH', channel, '')
end
return freed
""",
)


def release_permit_prefix_call(space: Keyspace, key: str, *, prefix: str) -> bytes:
    """Pack :data:`RELEASE_PERMIT_PREFIX`."""
    keys = [space.permits(key), space.permit_holders(key)]
    return RELEASE_PERMIT_PREFIX.call(keys, [prefix, space.released(key)])


#: The live permits: owner, ``<token>|<meta>`` and lease left (ms), for each.
LIST_PERMITS: Final = Script(
    "list_permits",
    keys=_PERMIT_KEYS,
    args=(),
    body="""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', permits, '(' .. now, '+inf', 'WITHSCORES')
local found = {}
for i = 1, #live, 2 do
    table.insert(found, {live[i], redis.call('HGET', holders, live[i]) or '0|', tonumber(live[i + 1]) - now})
end
return found
""",
)


def list_permits_call(space: Keyspace, key: str) -> bytes:
    """Pack :data:`LIST_PERMITS`."""
    return LIST_PERMITS.call([space.permits(key), space.permit_holders(key)], [])


@dataclass(frozen=True)
class StoredPermit:
    """One node's copy of a permit: its owner, fencing token, metadata and lease left."""

    owner: str
    token: int
    meta: dict[str, Any]
    pttl_ms: int


def parse_permits(reply: Any) -> list[StoredPermit]:
    """What :data:`LIST_PERMITS` answered on one node; empty for an error or no reply."""
    if not isinstance(reply, list):
        return []
    permits = []
    for owner, entry, pttl in reply:
        token, _, meta = reply_text(entry).partition("|")
        permits.append(StoredPermit(reply_text(owner), int(token or 0), parse_metadata(meta) or {}, int(pttl)))
    return permits


def quorum_permits(replies: Sequence[Any], quorum: int) -> list[dict[str, Any]]:
    """The permits at least ``quorum`` of :data:`LIST_PERMITS`'s ``replies`` hold, oldest first (by token).

    Each is the holder's metadata with its ``token`` and ``ttl``: the
    seconds left on the node that has the least.
    """
    copies: dict[str, list[StoredPermit]] = {}
    for reply in replies:
        for permit in parse_permits(reply):
            copies.setdefault(permit.owner, []).append(permit)
    found = [
        {**held[0].meta, "token": max(p.token for p in held), "ttl": min(p.pttl_ms for p in held) / 1000}
        for held in copies.values()
        if len(held) >= quorum
    ]
    return sorted(found, key=lambda holder: int(holder["token"]))


#: Every semaphore script.
ALL: Final = (ACQUIRE_PERMIT, EXTEND_PERMIT, REPAIR_PERMIT, RELEASE_PERMIT, RELEASE_PERMIT_PREFIX, LIST_PERMITS)
