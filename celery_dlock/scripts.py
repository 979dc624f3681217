"""The Lua scripts that make every lock operation atomic on one node.

A lock is a hash at ``<prefix><key>`` with the fields ``owner`` (the
holder's random value), ``token`` (its fencing token) and ``meta`` (JSON
describing the holder), expiring with the lease.  Fencing tokens come from one
counter per node, ``<prefix>fence``, which never expires: a single counter
keeps tokens strictly increasing for every key without leaving one counter
behind per key ever locked.

The scripts are sent with EVALSHA.  Each connection loads them when it
connects, so the hot path never pays a NOSCRIPT round trip.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["ACQUIRE", "ALL", "EXTEND", "FENCE_FLOOR", "RELEASE", "RELEASE_PREFIX", "Script"]


@dataclass(frozen=True)
class Script:
    """A Lua script and the SHA1 digest Redis knows it by."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# KEYS[1]  the lock hash
# KEYS[2]  the node's fencing counter
# ARGV[1]  the acquirer's owner value
# ARGV[2]  the lease in milliseconds
# ARGV[3]  the holder metadata (JSON)
# return   {1, token} when the lock is ours, newly or already (which makes a
#          retried acquire idempotent); {0, holder metadata, holder pttl}
#          when another owner holds it
ACQUIRE = Script(
    "acquire",
    """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
    local token = redis.call('INCR', KEYS[2])
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'meta', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token}
end
if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(redis.call('HGET', KEYS[1], 'token'))}
end
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
# ARGV[1]  the owner value
# ARGV[2]  the channel that blocked acquirers listen on
# return   1 when the lock was ours and is now deleted, 0 otherwise
RELEASE = Script(
    "release",
    """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], '')
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

ALL = (ACQUIRE, EXTEND, RELEASE, RELEASE_PREFIX, FENCE_FLOOR)
