"""The mutual-exclusion checker: reads what the holders recorded and judges it.

It builds on :mod:`support.critical_sections` (``Section``) and the package's
interval checker (:func:`celery_dlock.testing.intervals.overlaps`) and adds
what a fault run needs: the unfenced counter's lost updates, the fenced
resource's log, the order of fencing tokens, and how soon the lock came back
after each fault healed.

Violations *without fencing* (what a client that trusts its lock sees):

* an **overlap**: two completed sections on the key whose ``[enter, exit]``
  intervals intersect on the shared monotonic clock;
* a **lost update**: the unfenced counter ends lower than the number of
  writes logged to it (each write is logged in the same ``MULTI`` as the
  ``SET``), because two sections read the same value.

Violations *with fencing* (what the fenced resource lets through), each
computed from the resource's own log, in the order it applied operations:

* ``stale-claim``: a claim accepted with a token not higher than one
  accepted before;
* ``stale-write``: a write accepted although a higher token (or another
  section) had been presented since its own claim;
* ``superseded``: an operation accepted from a section after the resource had
  already accepted one from a section that asked for the lock only after the
  first was granted, i.e. from a holder the lock had already replaced;
* ``fenced-lost-update``: an accepted write whose value is not the previous
  accepted value plus one.

The first two check the resource itself; the last two check the lock's
tokens through it.  Separately, **token inversions** count pairs where a
section that asked for the lock after another was granted got a token that is
not higher: the lock's promise that tokens rise across holders.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from fault_holder import COUNTER, ENTERED, EVENTS, FENCED_LOG, SECTIONS, WRITES
from support.critical_sections import Section

from celery_dlock.testing.intervals import most_at_once, overlaps

__all__ = ["History", "Verdict"]


@dataclass
class Verdict:
    """What the checker found in one history."""

    sections: int
    entered: int
    overlaps: int
    lost_updates: int
    fenced: dict[str, int]
    token_inversions: int
    fenced_refusals: int
    events: dict[str, int]
    #: How many holders the key admits (above 1, a semaphore).
    limit: int = 1
    #: The most sections open at one instant, per key.
    most_at_once: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def over_limit(self) -> int:
        """How far past its limit the busiest key went: 0 when the limit held."""
        return max(0, max(self.most_at_once.values(), default=0) - self.limit)

    @property
    def unfenced_violations(self) -> int:
        """What a client without fencing suffers: overlaps and lost updates; for a semaphore, holders past its limit."""
        return self.overlaps + self.lost_updates if self.limit == 1 else self.over_limit

    @property
    def fenced_violations(self) -> int:
        """Everything the fenced resource should have refused and did not."""
        return sum(self.fenced.values())

    def summary(self) -> str:
        """One line for failure messages."""
        return (
            f"{self.sections} sections ({self.entered} entered), overlaps={self.overlaps}, "
            f"lost updates={self.lost_updates}, fenced violations={self.fenced}, "
            f"token inversions={self.token_inversions}, fenced refusals={self.fenced_refusals}, "
            f"most at once={self.most_at_once} (limit {self.limit}), events={self.events}"
        )


@dataclass
class History:
    """Everything recorded in one run, read back from the recorder."""

    entered: list[dict[str, Any]]
    sections: list[dict[str, Any]]
    events: list[dict[str, Any]]
    writes: list[dict[str, Any]]
    fenced_log: list[dict[str, Any]]
    counter: int

    @classmethod
    def load(cls, recorder: redis.Redis) -> History:
        """Read the history off the recorder, all of it at one instant (in one MULTI)."""
        with recorder.pipeline(transaction=True) as pipe:
            for key in (ENTERED, SECTIONS, EVENTS, WRITES, FENCED_LOG):
                pipe.lrange(key, 0, -1)
            pipe.get(COUNTER)
            *lists, counter = pipe.execute()
        entered, sections, events, writes, fenced_log = ([json.loads(raw) for raw in raw_list] for raw_list in lists)
        return cls(entered, sections, events, writes, fenced_log, int(counter or 0))

    def to_json(self) -> dict[str, Any]:
        """The raw history, for the saved file."""
        return {
            "entered": self.entered,
            "sections": self.sections,
            "events": self.events,
            "writes": self.writes,
            "fenced_log": self.fenced_log,
            "counter": self.counter,
        }

    # -- the checks ---------------------------------------------------------------

    def as_sections(self) -> list[Section]:
        """Completed sections, in the shape :mod:`support.critical_sections` records."""
        return [Section(s["key"], s["token"], s["enter"], s["exit"]) for s in self.sections]

    def overlapping_pairs(self) -> list[tuple[Section, Section]]:
        """Sections on one key whose intervals intersect, each with the earlier one that ends last."""
        return overlaps(self.as_sections())

    def lost_updates(self) -> int:
        """Logged writes to the unfenced counter that it does not show."""
        return len(self.writes) - self.counter

    def token_inversions(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Pairs (earlier, later) where ``later`` asked after ``earlier`` was granted, with no higher token."""
        found = []
        by_key: dict[str, list[dict[str, Any]]] = {}
        for entry in self.entered:
            by_key.setdefault(entry["key"], []).append(entry)
        for entries in by_key.values():
            granted = sorted(entries, key=lambda e: e["enter"])
            enters = [e["enter"] for e in granted]
            best: list[dict[str, Any]] = []  # best[i]: highest-token entry among granted[: i + 1]
            for entry in granted:
                if not best or entry["token"] > best[-1]["token"]:
                    best.append(entry)
                else:
                    best.append(best[-1])
            for later in entries:
                before = bisect.bisect_left(enters, later["requested"])
                if before and best[before - 1]["token"] >= later["token"]:
                    found.append((best[before - 1], later))
        return found

    def fenced_violations(self) -> tuple[Counter[str], dict[str, list[Any]]]:
        """Replay the fenced resource's log; count what it should not have accepted."""
        counts: Counter[str] = Counter()
        examples: dict[str, list[Any]] = {}
        sections = {e["section"]: e for e in self.entered}

        def flag(kind: str, op: dict[str, Any]) -> None:
            counts[kind] += 1
            examples.setdefault(kind, []).append(op)

        top, owner, value = 0, None, 0
        latest_request = -1  # the latest 'requested' among sections with an accepted op
        for op in self.fenced_log:
            if not op["ok"]:
                continue
            token, section = op["token"], op["section"]
            if op["op"] == "claim":
                if token <= top:
                    flag("stale-claim", op)
                top, owner = token, section
            else:
                if token != top or section != owner:
                    flag("stale-write", op)
                if int(op["value"]) != value + 1:
                    flag("fenced-lost-update", op)
                value = int(op["value"])
            entry = sections.get(section)
            if entry is not None:
                if latest_request > entry["enter"]:
                    flag("superseded", op)
                latest_request = max(latest_request, entry["requested"])
        return counts, examples

    def verdict(self, limit: int = 1) -> Verdict:
        """Run every check; ``limit`` is how many holders the key admits.

        The fenced resource takes one writer, so with ``limit`` above 1 its
        checks are left out: holders at once are judged by the limit instead.
        """
        fenced, examples = self.fenced_violations() if limit == 1 else (Counter[str](), {})
        pairs = self.overlapping_pairs()
        inversions = self.token_inversions()
        if pairs:
            examples["overlaps"] = [[a.__dict__, b.__dict__] for a, b in pairs[:5]]
        if inversions:
            examples["token_inversions"] = [list(pair) for pair in inversions[:5]]
        return Verdict(
            sections=len(self.sections),
            entered=len(self.entered),
            overlaps=len(pairs),
            lost_updates=self.lost_updates(),
            fenced={kind: fenced.get(kind, 0) for kind in ("stale-claim", "stale-write", "superseded",
                                                           "fenced-lost-update")},
            token_inversions=len(inversions),
            fenced_refusals=sum(1 for op in self.fenced_log if not op["ok"]),
            events=dict(Counter(e["kind"] for e in self.events)),
            limit=limit,
            most_at_once=most_at_once(self.as_sections()),
            examples=examples,
        )  # fmt: skip

    # -- liveness -------------------------------------------------------------------

    def first_entry_after(self, t_ns: int, key: str | None = None) -> int | None:
        """The earliest section entry at or after ``t_ns`` (ns), if any."""
        after = [e["enter"] for e in self.entered if e["enter"] >= t_ns and (key is None or e["key"] == key)]
        return min(after) if after else None

    def entries_between(self, start_ns: int, end_ns: int) -> list[dict[str, Any]]:
        """Sections entered in ``[start_ns, end_ns)``."""
        return [e for e in self.entered if start_ns <= e["enter"] < end_ns]

    def events_of(self, kind: str, since_ns: int = 0) -> list[dict[str, Any]]:
        """Events of ``kind`` at or after ``since_ns``."""
        return [e for e in self.events if e["kind"] == kind and e["t"] >= since_ns]

    def section(self, holder: str) -> list[dict[str, Any]]:
        """The completed sections of one holder."""
        return [s for s in self.sections if s["holder"] == holder]

    def longest_gap_after(self, t_ns: int) -> float:
        """The longest time (s) between two section entries, among those after ``t_ns``: how long the lock stopped."""
        entries = sorted(e["enter"] for e in self.entered)
        return max((later - earlier) / 1e9 for earlier, later in itertools.pairwise(entries) if later > t_ns)

    def tokens_fell_back(self, before_ns: int, after_ns: int) -> int:
        """How far the lowest token entered after ``after_ns`` is below the highest entered before ``before_ns``."""
        before = [e["token"] for e in self.entered if e["enter"] < before_ns]
        after = [e["token"] for e in self.entered if e["enter"] > after_ns]
        return max(0, max(before) - min(after))

    def accepted_sections(self) -> list[Section]:
        """The sections whose claim and write the fenced resource both accepted."""
        return [
            Section(s["key"], s["token"], s["enter"], s["exit"]) for s in self.sections if s["claimed"] and s["wrote"]
        ]


def save_history(path: Path, history: History, extra: dict[str, Any]) -> Path:
    """Write the history and ``extra`` (faults, seed, verdict) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, **history.to_json()}, indent=1, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "__dict__"):
        return value.__dict__
    return repr(value)
