"""The Redis Cluster topology: six real nodes joined by redis-cli, planned and unplanned failover.

Bounds are about twice the worst of what was measured on a two-core machine
(node timeout 1000 ms): ready in about 2.05 s (the masters hold back
``cluster_state:ok`` for two seconds after they start), ``CLUSTER FAILOVER``
settled in 0.3-0.5 s, a killed master replaced in 2.2-3.0 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError
from support.cluster import ClusterTopology

from celery_dlock.testing.cluster_process import SLOTS
from celery_dlock.testing.cluster_process import ClusterTopology as BaseTopology
from celery_dlock.testing.polling import wait_until
from celery_dlock.testing.redis_process import RedisProcess, find_redis_cli, find_redis_server

#: From start() to every node agreeing, measured 2.05-2.07 s.
STARTUP_BOUND = 5.0
#: From CLUSTER FAILOVER to every node agreeing, measured 0.27-0.48 s.
FAILOVER_BOUND = 2.0
#: From SIGKILL of a master to its slot served again, measured 2.2-3.0 s:
#: 1 s node timeout, the failure reports to gather, 0.5-1 s election delay.
KILL_BOUND = 6.0


def serves(client: RedisCluster, key: str) -> bool:
    """Whether a write to ``key``'s slot through the cluster client succeeds now."""
    try:
        return bool(client.set(f"{key}:probe", "1"))
    except redis.RedisError:
        return False


def cluster_info(server: RedisProcess) -> dict[str, str]:
    text = server.client(decode_responses=True).execute_command("CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def test_redis_cli_is_the_one_next_to_the_server_else_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = Path(find_redis_server())
    if (server.parent / "redis-cli").is_file():
        assert find_redis_cli() == str(server.parent / "redis-cli")
    lonely = tmp_path / "redis-server"
    lonely.write_text("")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no redis-cli"):
        find_redis_cli(str(lonely))


def test_a_topology_comes_up_fast_and_stop_leaves_no_process() -> None:
    started = time.monotonic()
    topology = BaseTopology().start()
    elapsed = time.monotonic() - started
    try:
        processes = [psutil.Process(server.process.pid) for server in topology.servers if server.process]
        dirs = [server.dir for server in topology.servers]
        assert len(processes) == 6
        assert all(process.is_running() for process in processes)
        assert elapsed < STARTUP_BOUND, f"ready after {elapsed:.2f} s"
    finally:
        topology.stop()
    assert not [process for process in processes if process.is_running()]
    assert not [path for path in dirs if path.exists()]
    assert not topology.running


def test_three_masters_each_with_a_replica_agree_on_every_slot(redis_cluster: ClusterTopology) -> None:
    masters, replicas = redis_cluster.masters, redis_cluster.replicas
    assert len(masters) == 3
    assert len(replicas) == 3
    assert set(masters) | set(replicas) == set(redis_cluster.servers)
    assert [redis_cluster.replica_of(master) for master in masters] == replicas
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{masters[0].port}"
    assert redis_cluster.urls == [f"redis+cluster://127.0.0.1:{master.port}" for master in masters]
    assert sorted(redis_cluster.startup_nodes) == sorted(("127.0.0.1", s.port) for s in redis_cluster.servers)
    for server in redis_cluster.servers:
        info = cluster_info(server)
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == SLOTS
    slot_maps = {str(sorted(server.client().execute_command("CLUSTER", "SLOTS"))) for server in redis_cluster.servers}
    assert len(slot_maps) == 1
    assert redis_cluster.master_for_slot(0) is masters[0]
    assert redis_cluster.master_for_slot(SLOTS - 1) is masters[-1]


def test_a_key_written_through_the_client_lands_on_master_for_key(clean_redis_cluster: ClusterTopology) -> None:
    client = clean_redis_cluster.client()
    keys = ["alpha", "bravo", "charlie", "{tag}:one", "{tag}:two"]
    for key in keys:
        client.set(key, key)
    assert clean_redis_cluster.master_for_key("{tag}:one") is clean_redis_cluster.master_for_key("{tag}:two")
    for key in keys:
        owner = clean_redis_cluster.master_for_key(key)
        assert owner is clean_redis_cluster.master_for_slot(key_slot(key.encode()))
        assert owner.client().get(key) == key.encode()
        for other in clean_redis_cluster.masters:
            if other is not owner:
                with pytest.raises(MovedError) as moved:
                    other.client().get(key)
                assert moved.value.node_addr == ("127.0.0.1", owner.port)


def test_failover_moves_the_slot_to_the_replica_and_keeps_the_key(clean_redis_cluster: ClusterTopology) -> None:
    topology = clean_redis_cluster
    client = topology.client()
    key = "failover"
    slot = key_slot(key.encode())
    client.set(key, "kept")
    old = topology.master_for_slot(slot)
    replica = topology.replica_of(old)

    started = time.monotonic()
    new = topology.failover(slot)
    elapsed = time.monotonic() - started

    assert new is replica
    assert elapsed < FAILOVER_BOUND, f"settled after {elapsed:.2f} s"
    assert topology.master_for_slot(slot) is new
    assert topology.replica_of(new) is old
    assert new.client().get(key) == b"kept"
    with pytest.raises(MovedError) as moved:
        old.client().get(key)
    assert (moved.value.slot_id, moved.value.node_addr) == (slot, ("127.0.0.1", new.port))
    assert client.get(key) == b"kept"  # the client follows the MOVED
    assert len(topology.masters) == 3


def test_a_killed_master_is_replaced_by_its_replica_within_the_bound(clean_redis_cluster: ClusterTopology) -> None:
    topology = clean_redis_cluster
    client = topology.client()
    key = "unplanned"
    slot = key_slot(key.encode())
    client.set(key, "replicated")
    old = topology.server(topology.master_for_slot(slot))
    replica = topology.replica_of(old)
    assert old.client().wait(1, 1000) == 1  # on the replica before the kill

    started = time.monotonic()
    new = topology.kill_master(slot)
    wait_until(lambda: serves(client, key), KILL_BOUND, message=f"slot {slot} to be served again")
    elapsed = time.monotonic() - started

    assert new is replica
    assert not old.running
    assert elapsed < KILL_BOUND, f"served again after {elapsed:.2f} s"
    assert topology.master_for_slot(slot) is new
    assert client.get(key) == b"replicated"
    assert old not in topology.masters + topology.replicas
    for server in topology.servers:
        if server.running:
            assert cluster_info(server)["cluster_state"] == "ok"

    topology.restart(old)

    assert topology.replica_of(new) is old
    assert old.client().execute_command("ROLE")[0] == b"slave"
    assert len(topology.masters) == len(topology.replicas) == 3


def test_flushall_empties_every_master(clean_redis_cluster: ClusterTopology) -> None:
    client = clean_redis_cluster.client()
    keys = [f"key-{n}" for n in range(30)]
    for key in keys:
        client.set(key, "x")
    assert len({clean_redis_cluster.master_for_key(key).port for key in keys}) == 3

    clean_redis_cluster.flushall()

    assert all(client.get(key) is None for key in keys)


def test_heal_brings_back_a_killed_replica_and_resumes_a_paused_one(clean_redis_cluster: ClusterTopology) -> None:
    topology = clean_redis_cluster
    killed, paused = (topology.server(replica) for replica in topology.replicas[:2])
    killed.kill()
    paused.pause()

    topology.heal()

    assert killed.running
    assert paused.process is not None
    assert not paused.process.paused
    assert len(topology.masters) == len(topology.replicas) == 3
