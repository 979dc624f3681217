"""The Lua scripts that make every lock operation atomic on one node.

A lock is a hash at ``<prefix>lock:<key>`` with the fields ``owner`` (the
holder's random value), ``token`` (its fencing token) and ``meta`` (JSON
describing the holder), expiring with the lease.  Fencing tokens come from one
counter per node, ``<prefix>fence``, which never expires: a single counter
keeps tokens strictly increasing for every key without leaving one counter
behind per key ever locked.

A key with a handoff queue also has ``<prefix>queue:<key>``, a list of
tickets in arrival order, and ``<prefix>parked:<key>``, a hash from ticket to
the parked payload; ``<prefix>queues`` is the set of keys whose queue is not
empty.  A ticket stays at the head of its queue until the handed-off payload
claims the lock with it, so a handoff that is lost in flight is handed off
again, and a payload delivered twice runs once: the second copy finds its
ticket gone.  While a handoff is in flight the lock is *reserved*: its owner
is ``park:<ticket>``, which only that ticket can take.

The scripts are sent with EVALSHA.  Each connection loads them when it
connects, so the hot path never pays a NOSCRIPT round trip.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = [
    "ACQUIRE",
    "ACQUIRE_QUEUED",
    "ALL",
    "EXTEND",
    "FENCE_FLOOR",
    "FORCE_RELEASE",
    "PARK",
    "RELEASE",
    "RELEASE_HANDOFF",
    "RELEASE_PREFIX",
    "RELEASE_PREFIX_HANDOFF",
    "SWEEP",
    "Script",
]


@dataclass(frozen=True)
class Script:
    """A Lua script and the SHA1 digest Redis knows it by."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def _counter(key: int, label: int) -> str:
    """Lua ``count(event)``: HINCRBY ``<label>:<event>`` in KEYS[key], if given.

    Counting rides in the script that does the work, so it costs no round
    trip; callers that want no counters pass neither the key nor the label.
    """
    return f"""
local function count(event)
    if KEYS[{key}] then
        redis.call('HINCRBY', KEYS[{key}], ARGV[{label}] .. ':' .. event, 1)
    end
end
"""


# KEYS[1]  the lock hash
# KEYS[2]  the node's fencing counter
# KEYS[3]  optional: the counters hash (ARGV[4] is then the counters' label)
# ARGV[1]  the acquirer's owner value
# ARGV[2]  the lease in milliseconds
# ARGV[3]  the holder metadata (JSON)
# return   {1, token} when the lock is ours, newly or already (which makes a
#          retried acquire idempotent); {0, holder metadata, holder pttl}
#          when another owner holds it
ACQUIRE = Script(
    "acquire",
    _counter(3, 4)
    + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
    local token = redis.call('INCR', KEYS[2])
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'meta', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    count('acquired')
    return {1, token}
end
if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(redis.call('HGET', KEYS[1], 'token'))}
end
count('busy')
return {0, redis.call('HGET', KEYS[1], 'meta'), redis.call('PTTL', KEYS[1])}
""",
)

# KEYS[1]  the lock hash
# ARGV[1]  the owner value
# ARGV[2]  the lease in milliseconds
# return   1 when the lease was renewed, 0 when the lock is not ours
EXTEND = Script(
    "extend",
    """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
""",
)

# KEYS[1]  the lock hash
# KEYS[2]  optional: the counters hash (ARGV[3] is then the counters' label)
# ARGV[1]  the owner value
# ARGV[2]  the channel that blocked acquirers listen on, or '' to wake none
# return   1 when the lock was ours and is now deleted, 0 otherwise
RELEASE = Script(
    "release",
    _counter(2, 3)
    + """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[2] ~= '' then
        redis.call('PUBLISH', ARGV[2], '')
    end
    count('released')
    return 1
end
return 0
""",
)

# KEYS[1]  the lock hash
# ARGV[1]  the channel that blocked acquirers listen on
# return   1 when a lock was deleted, whoever held it
FORCE_RELEASE = Script(
    "force_release",
    """
if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('PUBLISH', ARGV[1], '')
    return 1
end
return 0
""",
)

# KEYS[1]  the lock hash
# ARGV[1]  a prefix of the owner value
# ARGV[2]  the channel that blocked acquirers listen on
# return   1 when the lock's owner began with ARGV[1] and is now deleted
RELEASE_PREFIX = Script(
    "release_prefix",
    """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and string.sub(owner, 1, string.len(ARGV[1])) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], '')
    return 1
end
return 0
""",
)

# KEYS[1]  the node's fencing counter
# ARGV[1]  a token issued by a quorum
# return   the counter after raising it to at least ARGV[1]
FENCE_FLOOR = Script(
    "fence_floor",
    """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if current < floor then
    redis.call('SET', KEYS[1], floor)
    return floor
end
return current
""",
)

# -- handoff queues ---------------------------------------------------------------
#
# Every script below takes the same four keys and ends the holder's turn the
# same way, so the shared pieces are Lua snippets joined in Python.
#   KEYS[1]  the lock hash          KEYS[2]  the queue (list of tickets)
#   KEYS[3]  parked payloads (hash) KEYS[4]  the set of keys with a queue

# Reserve the lock for the oldest parked ticket, or delete it when none is
# parked.  ARGV[R] is the reservation lease in ms, ARGV[K] the key, ARGV[C]
# the release channel.  Returns {1, ticket, payload} or {1}.
_HAND_OFF = """
local function hand_off(reserve_ms, key, channel)
    while true do
        local head = redis.call('LINDEX', KEYS[2], 0)
        if not head then
            redis.call('DEL', KEYS[1])
            redis.call('SREM', KEYS[4], key)
            redis.call('PUBLISH', channel, '')
            return {1}
        end
        local payload = redis.call('HGET', KEYS[3], head)
        if payload then
            redis.call('DEL', KEYS[1])
            redis.call('HSET', KEYS[1], 'owner', 'park:' .. head, 'token', 0, 'meta', cjson.encode({handoff = head}))
            redis.call('PEXPIRE', KEYS[1], reserve_ms)
            return {1, head, payload}
        end
        redis.call('LPOP', KEYS[2])
    end
end
"""

# KEYS[5] optional counters hash, with ARGV[5] its label
# ARGV[1] owner  ARGV[2] channel  ARGV[3] reservation ms  ARGV[4] key
# return  {0} when the lock is not ours, else what hand_off returns
RELEASE_HANDOFF = Script(
    "release_handoff",
    _HAND_OFF
    + _counter(5, 5)
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
    return {0}
end
count('released')
return hand_off(ARGV[3], ARGV[4], ARGV[2])
""",
)

# As RELEASE_HANDOFF, but ARGV[1] is a prefix of the owner value: the worker's
# main process frees a dead pool process's lock this way.
RELEASE_PREFIX_HANDOFF = Script(
    "release_prefix_handoff",
    _HAND_OFF
    + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or string.sub(owner, 1, string.len(ARGV[1])) ~= ARGV[1] then
    return {0}
end
return hand_off(ARGV[3], ARGV[4], ARGV[2])
""",
)

# Hand off a queue whose lock is gone (its holder died, or a reservation ran
# out).  ARGV[1] reservation ms  ARGV[2] key  ARGV[3] channel
# return  {0} when the lock is held or the queue is empty, else {1, ticket, payload}
SWEEP = Script(
    "sweep",
    _HAND_OFF
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return {0}
end
local outcome = hand_off(ARGV[1], ARGV[2], ARGV[3])
if #outcome == 1 then
    return {0}
end
return outcome
""",
)

# Park a payload behind the holder.
# ARGV[1] ticket  ARGV[2] payload  ARGV[3] max queued  ARGV[4] key
# ARGV[5] '1' to coalesce: fold into the newest entry not yet handed off
# return  {0} when the lock is free (acquire instead), {2} when the queue is
#         full, {1, ticket} with the ticket the payload now rides on
PARK = Script(
    "park",
    """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
    return {0}
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
    return {1, ARGV[1]}
end
if ARGV[5] == '1' then
    local tail = redis.call('LINDEX', KEYS[2], -1)
    if tail and owner ~= 'park:' .. tail and redis.call('HEXISTS', KEYS[3], tail) == 1 then
        redis.call('HSET', KEYS[3], tail, ARGV[2])
        return {1, tail}
    end
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3]) then
    return {2}
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
return {1, ARGV[1]}
""",
)

# Acquire a key that has a handoff queue.
# KEYS[5]  the node's fencing counter
# KEYS[6]  optional: the counters hash, with ARGV[8] its label
# ARGV[1] owner  ARGV[2] lease ms  ARGV[3] metadata  ARGV[4] ticket or ''
# ARGV[5] reservation ms  ARGV[6] key  ARGV[7] channel
# return  {1, token}: the lock is ours (a ticket is claimed: it leaves the queue)
#         {0, meta, pttl}: held by another (a ticket stays parked)
#         {3}: the ticket was claimed already; this copy is a duplicate
#         {4, ticket, payload}: the lock was free but tickets were stranded;
#           it is now reserved for the oldest, which the caller must hand off
ACQUIRE_QUEUED = Script(
    "acquire_queued",
    _HAND_OFF
    + _counter(6, 8)
    + """
local function grant()
    count('acquired')
    local token = redis.call('INCR', KEYS[5])
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'meta', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token}
end
local owner = redis.call('HGET', KEYS[1], 'owner')
local ticket = ARGV[4]
if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(redis.call('HGET', KEYS[1], 'token'))}
end
if ticket ~= '' then
    if redis.call('HEXISTS', KEYS[3], ticket) == 0 then
        return {3}
    end
    if owner and owner ~= 'park:' .. ticket then
        count('busy')
        return {0, redis.call('HGET', KEYS[1], 'meta'), redis.call('PTTL', KEYS[1])}
    end
    redis.call('LREM', KEYS[2], 1, ticket)
    redis.call('HDEL', KEYS[3], ticket)
    if redis.call('LLEN', KEYS[2]) == 0 then
        redis.call('SREM', KEYS[4], ARGV[6])
    end
    return grant()
end
if owner then
    count('busy')
    return {0, redis.call('HGET', KEYS[1], 'meta'), redis.call('PTTL', KEYS[1])}
end
local outcome = hand_off(ARGV[5], ARGV[6], ARGV[7])
if #outcome == 3 then
    return {4, outcome[2], outcome[3]}
end
return grant()
""",
)

ALL = (
    ACQUIRE,
    EXTEND,
    RELEASE,
    RELEASE_PREFIX,
    FORCE_RELEASE,
    FENCE_FLOOR,
    RELEASE_HANDOFF,
    RELEASE_PREFIX_HANDOFF,
    SWEEP,
    PARK,
    ACQUIRE_QUEUED,
)
