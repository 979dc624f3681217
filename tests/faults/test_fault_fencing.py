"""How to fence a read-modify-write: what one fenced write at the end misses.

The fence refuses a token lower than one it has seen.  If the only fenced
operation is the final write, a holder paused after its read but woken before
the next holder writes still gets its write in (its token is the highest the
store has seen), and the next holder, which read the same old value, then
overwrites it: an update is lost although every write was fenced.  Presenting
the token when the section starts (a claim) closes that gap: the stale write
finds a higher token and is refused, so the client knows it failed.
"""

from __future__ import annotations

import time

import pytest
from fault_harness import Scenario

from celery_dlock import Redlock

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

# KEYS[1] balance, KEYS[2] fence; ARGV[1] new balance, ARGV[2] token.
# A single fenced write: accepted when the token is above the fence.
WRITE_IF_NEWER = """
if tonumber(ARGV[2]) <= tonumber(redis.call('GET', KEYS[2]) or '0') then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# Claim: raise the fence to the token if it is higher.  ARGV[1] the token.
CLAIM = """
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# Write under a claim: accepted while the fence is still this token.
WRITE_IF_CLAIMED = """
if tonumber(ARGV[2]) ~= tonumber(redis.call('GET', KEYS[2]) or '0') then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def paused_then_overtaken(scenario: Scenario, claim_first: bool) -> tuple[int, list[int]]:
    """A reads, pauses past its lease, B takes over and reads, A writes, B writes."""
    quorum = scenario.quorum(3)
    store = scenario.recorder
    store.set("balance", 100)
    redlock = Redlock(quorum.urls)
    claim = store.register_script(CLAIM)
    write = store.register_script(WRITE_IF_CLAIMED if claim_first else WRITE_IF_NEWER)

    a = redlock.acquire("account", ttl=0.3)
    if claim_first:
        assert claim(keys=["fence"], args=[a.token])
    a_read = int(store.get("balance"))
    time.sleep(0.5)  # A is paused (a GC, a stop-the-world) past its 0.3 s lease

    b = redlock.acquire("account", ttl=5)
    assert b.token > a.token
    if claim_first:
        assert claim(keys=["fence"], args=[b.token])
    b_read = int(store.get("balance"))

    accepted = [
        int(write(keys=["balance", "fence"], args=[a_read + 10, a.token])),  # A wakes up and charges 10
        int(write(keys=["balance", "fence"], args=[b_read + 20, b.token])),  # B charges 20
    ]
    b.release()
    return int(store.get("balance")), accepted


def test_one_fenced_write_at_the_end_can_lose_an_update(scenario: Scenario) -> None:
    balance, accepted = paused_then_overtaken(scenario, claim_first=False)
    assert accepted == [1, 1], "both writes were accepted..."
    assert balance == 120, "...and A's 10 is gone without anyone being told"


def test_claiming_the_token_first_refuses_the_stale_write(scenario: Scenario) -> None:
    balance, accepted = paused_then_overtaken(scenario, claim_first=True)
    assert accepted == [0, 1], "A's stale write is refused, so A knows its charge did not happen"
    assert balance == 120
