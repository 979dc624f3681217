"""The fault-injection harness: lock nodes, holder processes, faults, a run's record.

* :class:`Quorum`: 3 or 5 independent ``redis-server`` masters on free
  loopback ports, each in its own temporary directory with its own
  persistence options (:mod:`support.redis_servers` does the spawning).  Every fault
  goes through a method here (kill, stop, wipe, restart now or after a delay,
  pause, resume, a clock step), which logs it with the time it happened.
* :class:`HolderProcess`: a lock holder in its own process
  (:mod:`fault_holder`, run as a :class:`~celery_dlock.testing.process.ManagedProcess`),
  which a test can pause, resume or kill, and which can carry
  ``DLOCK_FAULT_POINTS`` to kill itself at a named point.
* :class:`Scenario`: one test's run: its recorder (a redis-server no fault
  touches), its quorums, holders and fault log, the checker's verdict, and
  the JSON history saved when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from fault_checker import History, Verdict, save_history
from fault_holder import STOP, HolderSpec, gate_flag, inside_flag
from support.redis_servers import RedisCluster, RedisServer

from celery_dlock.lock.nodes import COOLDOWN_MAX
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.process import ManagedProcess, log_tails

FAULTS_DIR = Path(__file__).resolve().parent
HOLDER_SCRIPT = FAULTS_DIR / "fault_holder.py"

#: Node options: nothing survives a kill -9 (the default of :class:`~support.redis_servers.RedisServer`).
VOLATILE: tuple[str, ...] = ()
#: Every write is fsynced before the client hears of it.
FSYNC_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")

#: ``DLOCK_SOAK=1`` selects the long soak: more rounds, more examples.
SOAK = os.environ.get("DLOCK_SOAK", "") not in ("", "0")
#: The base seed; every test derives its own from it and its name.
BASE_SEED = int(os.environ.get("DLOCK_FAULT_SEED", "20261126"))
#: Keep every history, not only those of failed tests.
KEEP_HISTORIES = os.environ.get("DLOCK_FAULT_KEEP", "") not in ("", "0")


def soak(short: Any, long: Any) -> Any:
    """``short`` normally, ``long`` under ``DLOCK_SOAK=1``."""
    return long if SOAK else short


def now_ns() -> int:
    """The shared clock: ``time.monotonic_ns()``."""
    return time.monotonic_ns()


# -- the fault log --------------------------------------------------------------------


@dataclass
class FaultLog:
    """Every fault injected in a run, in order, on the shared clock."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, **detail: Any) -> int:
        """Log one fault; returns its time."""
        t = now_ns()
        self.entries.append({"kind": kind, "t": t, **detail})
        return t

    def kinds(self) -> dict[str, int]:
        """How many faults of each kind."""
        return dict(Counter(entry["kind"] for entry in self.entries))


# -- lock nodes ---------------------------------------------------------------------------


#: A clock step on a node, emulated: every key with a time to live loses
#: ARGV[2] milliseconds of it, as if the node's clock had jumped forward
#: (keys whose time runs out are deleted).  ARGV[1] is the KEYS pattern.
PTTL_SHRINK = """
local n = 0
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
    local left = redis.call('PTTL', key)
    if left > 0 then
        left = left - tonumber(ARGV[2])
        if left <= 0 then
            redis.call('DEL', key)
        else
            redis.call('PEXPIRE', key, left)
        end
        n = n + 1
    end
end
return n
"""


class Quorum:
    """Independent redis-server masters, with every fault a test may inject."""

    def __init__(self, size: int, faults: FaultLog, extra_args: Sequence[str] = VOLATILE) -> None:
        self.faults = faults
        self.extra_args = tuple(extra_args)
        self.cluster = RedisCluster(self.extra_args).start(size)
        self.paused: set[int] = set()

    def __len__(self) -> int:
        return len(self.cluster)

    @property
    def urls(self) -> list[str]:
        """The nodes' URLs, in order."""
        return self.cluster.urls

    @property
    def quorum(self) -> int:
        """How many nodes a lock needs."""
        return len(self) // 2 + 1

    def server(self, index: int) -> RedisServer:
        """One node's server."""
        return self.cluster[index]

    def client(self, index: int) -> redis.Redis:
        """A client of one node (one-second timeouts)."""
        return self.cluster[index].client()

    def running(self, index: int) -> bool:
        """Whether the node's process is up (paused counts as up)."""
        return self.cluster[index].running

    # -- faults -------------------------------------------------------------------

    def kill(self, *indexes: int) -> int:
        """``kill -9`` the nodes; returns the time."""
        for index in indexes:
            self.paused.discard(index)
            self.cluster[index].kill()
        return self.faults.add("node-kill", nodes=list(indexes))

    def stop(self, *indexes: int) -> int:
        """Shut the nodes down cleanly (``SIGTERM``)."""
        for index in indexes:
            self.paused.discard(index)
            self.cluster[index].terminate()
        return self.faults.add("node-stop", nodes=list(indexes))

    def start(self, *indexes: int, wipe: bool = False, kind: str | None = None) -> int:
        """Start stopped or killed nodes on their ports; ``wipe`` deletes their data first."""
        for index in indexes:
            server = self.cluster[index]
            if wipe:
                server.wipe()
            server.start()
        return self.faults.add(kind or ("node-wipe-restart" if wipe else "node-restart"), nodes=list(indexes))

    def restart(self, *indexes: int, wipe: bool = False, delay: float = 0.0) -> int:
        """Kill the nodes, optionally wait ``delay`` s, and start them (empty if ``wipe``)."""
        self.kill(*indexes)
        if delay:
            time.sleep(delay)
        kind = "node-restart"
        if wipe:
            kind = "node-wipe-restart-delayed" if delay else "node-wipe-restart"
        return self.start(*indexes, wipe=wipe, kind=kind)

    def pause(self, *indexes: int) -> int:
        """``SIGSTOP`` the nodes: they hang, connections stay open."""
        for index in indexes:
            self.cluster[index].pause()
            self.paused.add(index)
        return self.faults.add("node-pause", nodes=list(indexes))

    def resume(self, *indexes: int) -> int:
        """``SIGCONT`` paused nodes."""
        for index in indexes:
            self.cluster[index].resume()
            self.paused.discard(index)
        return self.faults.add("node-resume", nodes=list(indexes))

    def clock_step(self, *indexes: int, ms: int) -> int:
        """Emulate each node's clock jumping ``ms`` forward: every PTTL shrinks by ``ms``."""
        shrunk = []
        for index in indexes:
            client = self.cluster[index].client()
            shrunk.append(int(client.eval(PTTL_SHRINK, 0, "*", ms)))
        return self.faults.add("clock-step", nodes=list(indexes), ms=ms, keys=shrunk)

    def outage(self) -> int:
        """Kill every node."""
        t = self.kill(*range(len(self)))
        self.faults.entries[-1]["kind"] = "full-outage"
        return t

    def heal(self) -> int:
        """Resume paused nodes and start dead ones, keeping their data."""
        if self.paused:
            self.resume(*sorted(self.paused))
        dead = [i for i in range(len(self)) if not self.running(i)]
        if dead:
            self.start(*dead)
        return now_ns()

    def close(self) -> None:
        """Resume and kill every node, and delete their directories."""
        for index in list(self.paused):
            with contextlib.suppress(RuntimeError):
                self.cluster[index].resume()
        self.cluster.stop()


# -- holder processes -------------------------------------------------------------------


class HolderProcess(ManagedProcess):
    """One :mod:`fault_holder` process, logging to ``holder-<name>.log`` in ``log_dir``."""

    def __init__(self, spec: HolderSpec, log_dir: Path, fault_points: Sequence[str] = ()) -> None:
        self.spec = spec
        self.fault_points = tuple(fault_points)
        env = dict(os.environ)
        env.pop("DLOCK_FAULT_POINTS", None)
        if fault_points:
            env["DLOCK_FAULT_POINTS"] = ",".join(fault_points)
        super().__init__(
            [sys.executable, str(HOLDER_SCRIPT), spec.to_json()],
            log_path=log_dir / f"holder-{spec.holder}.log",
            cwd=FAULTS_DIR,
            env=env,
            name=f"holder {spec.holder}",
        )


# -- one run ------------------------------------------------------------------------------


@dataclass
class Timing:
    """The lock settings of a run, and the liveness bound they imply."""

    ttl: float = 1.0
    retry_delay: float = 0.02
    retry_jitter: float = 0.02
    socket_timeout: float = 0.2
    #: Allowance for a loaded two-core machine.
    slack: float = 1.5

    @property
    def liveness_bound(self) -> float:
        """Seconds from a fault healing to the next section entered.

        A lease orphaned by the fault runs out within one ttl; a waiting
        holder then needs one retry period and one attempt; a node that timed
        out is skipped for at most :data:`~celery_dlock.lock.nodes.COOLDOWN_MAX`.
        """
        retry = self.retry_delay + self.retry_jitter + self.socket_timeout
        return self.ttl + retry + COOLDOWN_MAX + self.slack


class Scenario:
    """One test's run: recorder, quorums, holders, faults, verdict and history."""

    def __init__(self, name: str, tmp_path: Path, seed: int, stats: Any = None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.seed = seed
        self.random = random.Random(seed)
        self.stats = stats
        self.faults = FaultLog()
        self.recorder_server = RedisServer().start()
        self.recorder = self.recorder_server.client(socket_timeout=10, socket_connect_timeout=10)
        self.quorums: list[Quorum] = []
        self.holders: list[HolderProcess] = []
        self.labels: set[str] = set()
        self.notes: dict[str, Any] = {}
        self._history: History | None = None
        self._verdict: Verdict | None = None
        self.history_path = tmp_path / f"history-{name}.json"
        self._counted = False

    @property
    def recorder_url(self) -> str:
        """Where holders record."""
        return self.recorder_server.url

    def quorum(self, size: int, extra_args: Sequence[str] = VOLATILE) -> Quorum:
        """Start ``size`` nodes, closed with the scenario."""
        quorum = Quorum(size, self.faults, extra_args)
        self.quorums.append(quorum)
        return quorum

    def spec(self, quorum: Quorum, holder: str, timing: Timing | None = None, **options: Any) -> HolderSpec:
        """A holder spec on ``quorum`` with this run's recorder, timing and seed."""
        timing = timing or Timing()
        options.setdefault("ttl", timing.ttl)
        options.setdefault("retry_delay", timing.retry_delay)
        options.setdefault("retry_jitter", timing.retry_jitter)
        options.setdefault("socket_timeout", timing.socket_timeout)
        return HolderSpec(
            nodes=quorum.urls, recorder=self.recorder_url, holder=holder, seed=self.random.randrange(2**31), **options
        )

    def spawn(self, spec: HolderSpec, fault_points: Sequence[str] = ()) -> HolderProcess:
        """Start a holder process."""
        holder = HolderProcess(spec, self.tmp_path, fault_points)
        self.holders.append(holder)
        return holder.start()

    def spawn_many(
        self, quorum: Quorum, count: int, timing: Timing | None = None, **options: Any
    ) -> list[HolderProcess]:
        """Start ``count`` holders on the same key."""
        start = len(self.holders)
        return [self.spawn(self.spec(quorum, f"h{start + i}", timing, **options)) for i in range(count)]

    # -- steering holders ------------------------------------------------------------

    def wait_inside(self, holder: str, timeout: float = 15.0) -> int:
        """Wait until a gated holder has read inside its section; returns the section number."""
        raw = wait_until(
            lambda: self.recorder.get(inside_flag(holder)),
            timeout,
            interval=0.01,
            message=f"{holder} inside its section",
        )
        self.recorder.delete(inside_flag(holder))
        return int(raw)

    def open_gate(self, holder: str) -> None:
        """Let a gated holder write."""
        self.recorder.set(gate_flag(holder), 1)

    def sections_done(self) -> int:
        """Completed sections so far."""
        return int(self.recorder.llen("sections"))

    def wait_progress(self, extra: int, timeout: float, since: int | None = None) -> int:
        """Wait for ``extra`` more completed sections; returns the count."""
        base = self.sections_done() if since is None else since
        return wait_until(
            lambda: (n := self.sections_done()) >= base + extra and n, timeout, interval=0.02,
            message=lambda: f"{extra} more sections (had {base})\n{self.holder_logs()}",
        )  # fmt: skip

    def stop_holders(self, timeout: float = 20.0) -> None:
        """Ask every holder to stop, resume paused ones, and wait for them."""
        self.recorder.set(STOP, 1)
        for holder in self.holders:
            if holder.paused:
                holder.resume()
        deadline = time.monotonic() + timeout
        for holder in self.holders:
            try:
                holder.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                holder.kill()
                raise AssertionError(f"{holder} did not stop within {timeout}s:\n{holder.log_tail()}") from None

    def holder_logs(self) -> str:
        """The tails of the holders' output."""
        return log_tails([holder for holder in self.holders if holder.log.strip()], 15)

    # -- judging ----------------------------------------------------------------------

    def history(self, *, reload: bool = False) -> History:
        """The recorded history (read once, unless ``reload``)."""
        if self._history is None or reload:
            self._history = History.load(self.recorder)
            self._verdict = None
        return self._history

    def verdict(self, *labels: str, limit: int = 1) -> Verdict:
        """Check the history; ``labels`` name the faults this run is about, for the summary.

        ``limit`` is how many holders the key admits (see :meth:`History.verdict`).
        """
        self.labels.update(labels)
        if self._verdict is None:
            self._verdict = self.history(reload=True).verdict(limit)
        self._count()
        return self._verdict

    def liveness(self, healed_at: int, timing: Timing, key: str | None = None) -> float:
        """Seconds from ``healed_at`` to the next section entered; asserts the bound."""
        first = self.history(reload=True).first_entry_after(healed_at, key)
        assert first is not None, self.explain(f"no section entered after the fault healed at {healed_at}")
        delay = (first - healed_at) / 1e9
        self.notes.setdefault("liveness", []).append(round(delay, 3))
        assert delay <= timing.liveness_bound, self.explain(
            f"the lock came back {delay:.2f}s after the fault healed; the bound is {timing.liveness_bound:.2f}s"
        )
        return delay

    def explain(self, message: str) -> str:
        """``message`` with the verdict and the path of the saved history."""
        path = self.save()
        verdict = self._verdict.summary() if self._verdict is not None else "(not judged)"
        return f"{message}\n  verdict: {verdict}\n  faults: {self.faults.kinds()}\n  history: {path}"

    def save(self) -> Path:
        """Write the JSON history (faults, seed, verdict and everything recorded)."""
        try:
            history = self.history(reload=True)
        except redis.RedisError:
            history = History([], [], [], [], [], 0)
        extra = {
            "scenario": self.name,
            "seed": self.seed,
            "base_seed": BASE_SEED,
            "soak": SOAK,
            "faults": self.faults.entries,
            "notes": self.notes,
            "verdict": asdict(self._verdict) if self._verdict is not None else None,
            "holders": [{"spec": asdict(h.spec), "returncode": h.returncode, "points": h.fault_points}
                        for h in self.holders],
        }  # fmt: skip
        return save_history(self.history_path, history, extra)

    def _count(self) -> None:
        if self.stats is None or self._counted or self._verdict is None:
            return
        self._counted = True
        self.stats.add(self)

    def close(self) -> None:
        """Kill what is left: holders (resumed first), nodes and the recorder."""
        for holder in self.holders:
            holder.kill()  # SIGKILL ends a paused holder too
        for quorum in self.quorums:
            quorum.close()
        self.recorder.close()
        self.recorder_server.stop()


@contextlib.contextmanager
def running(scenario: Scenario) -> Iterator[Scenario]:
    """Stop the scenario's holders on leaving the block, whatever happened."""
    try:
        yield scenario
    finally:
        with contextlib.suppress(Exception):
            scenario.stop_holders()
