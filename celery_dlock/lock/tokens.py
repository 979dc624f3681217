"""Fencing tokens that rise even across a wiped node or a promoted replica.

A token is the key's counter plus one, but never less than a *floor* that the
acquiring client takes from its wall clock: milliseconds since the epoch
times ``2 ** TOKEN_SHIFT``, so up to 1,024 grants per millisecond still get
their own token.  A node that comes back empty, or a replica promoted without
the newest grants, therefore starts above every token issued more than the
clocks' skew ago, instead of at 1.  The bound and what it assumes are in
``docs/guarantees.md`` ("Fencing").  Every client of one request sends the
same floor to every node, so a quorum agrees on the token without an extra
round trip.
"""

from __future__ import annotations

import time
from typing import Final

__all__ = ["MAX_SAFE_TOKEN", "TOKEN_SHIFT", "issued_at", "token_floor"]

#: Grants per millisecond that get tokens of their own above the floor: ``2 ** TOKEN_SHIFT``.
TOKEN_SHIFT: Final = 10

#: The largest integer a JavaScript number or a JSON double holds exactly;
#: tokens stay below it until the year 2248.
MAX_SAFE_TOKEN: Final = 2**53 - 1


def token_floor(now_ns: int | None = None) -> int:
    """The least token a grant now may carry: wall-clock milliseconds times ``2 ** TOKEN_SHIFT``."""
    ns = time.time_ns() if now_ns is None else now_ns
    return (ns // 1_000_000) << TOKEN_SHIFT


def issued_at(token: int) -> float:
    """The Unix time (seconds) a token's floor names: when it was issued, give or take clock skew."""
    return (token >> TOKEN_SHIFT) / 1000
