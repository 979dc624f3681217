"""Fencing tokens that rise even across a wiped node or a promoted replica.

A token is the key's counter plus one, but never less than a *floor* that the
acquiring client takes from its wall clock: milliseconds since
:data:`TOKEN_EPOCH_MS` (2025-01-01) times ``2 ** TOKEN_SHIFT``, so up to 64
grants of one key per millisecond get tokens above the floor (more still
get rising tokens, from the counter).  A node that comes back empty, or a replica promoted without
the newest grants, therefore starts above every token issued more than the
clocks' skew ago, instead of at 1.  A counter is raised to the floor only
once it has fallen :data:`FLOOR_SLACK_MS` behind it, so that a busy node
writes the floor a few times a second rather than on every grant; tokens are
then never more than that below the floor.  The bound and what it assumes are in
``docs/guarantees.md`` ("Fencing").  Every client of one request sends the
same floor to every node, so a quorum agrees on the token without an extra
round trip.
"""

from __future__ import annotations

import time
from typing import Final

__all__ = ["FLOOR_SLACK", "FLOOR_SLACK_MS", "TOKEN_EPOCH_MS", "TOKEN_LIMIT", "TOKEN_SHIFT", "issued_at", "token_floor"]

#: Grants of one key per millisecond that get tokens above the floor: ``2 ** TOKEN_SHIFT``.
TOKEN_SHIFT: Final = 6

#: How far, in milliseconds of floor, a counter may lag before a grant raises it to the floor.
FLOOR_SLACK_MS: Final = 50

#: :data:`FLOOR_SLACK_MS` in token units.
FLOOR_SLACK: Final = FLOOR_SLACK_MS << TOKEN_SHIFT

#: The floor counts milliseconds from 2025-01-01T00:00:00Z.
TOKEN_EPOCH_MS: Final = 1_735_689_600_000

#: Tokens stay below this until 2074: 14 digits, so they are exact as JSON, as
#: JavaScript numbers, and even in Lua's default number format (``%.14g``),
#: which a fenced store written as a Redis script may use.
TOKEN_LIMIT: Final = 10**14


def token_floor(now_ns: int | None = None) -> int:
    """The least token a grant now may carry: wall-clock milliseconds since the epoch, times ``2 ** TOKEN_SHIFT``."""
    ns = time.time_ns() if now_ns is None else now_ns
    return max(0, ns // 1_000_000 - TOKEN_EPOCH_MS) << TOKEN_SHIFT


def issued_at(token: int) -> float:
    """The Unix time (seconds) a token's floor names: when it was issued, give or take clock skew."""
    return ((token >> TOKEN_SHIFT) + TOKEN_EPOCH_MS) / 1000
