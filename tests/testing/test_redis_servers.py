"""The redis-server helpers themselves: the package's RedisProcess and the suite's RedisServer."""

from __future__ import annotations

import os
import socket

import pytest
import redis
from support.redis_servers import ClusterFactory, RedisCluster, RedisServer

from celery_dlock.testing.redis_process import find_redis_server

DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


def test_server_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.running
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.client().ping() is True
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping() is True


def test_killed_server_refuses_connections(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.ping()

    redis_server.kill()

    assert not redis_server.running
    with pytest.raises(redis.ConnectionError):
        client.ping()
    with pytest.raises(redis.ConnectionError, match="refused"):
        redis_server.client().ping()


def test_restart_keeps_port_and_wipe_loses_data(redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.client().set("key", "value")

    redis_server.restart(wipe=True)

    assert redis_server.port == port
    assert redis_server.client().get("key") is None


def test_restart_without_wipe_keeps_fsynced_data() -> None:
    with RedisServer(DURABLE) as server:
        port = server.port
        server.client().set("key", "value")

        server.restart()

        assert server.port == port
        assert server.client().get("key") == b"value"

        server.restart(wipe=True)

        assert server.client().get("key") is None


def test_paused_server_times_out_until_resumed(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.2)
    client.ping()

    redis_server.pause()
    with pytest.raises(redis.TimeoutError):
        client.ping()

    redis_server.resume()
    assert client.ping() is True


def test_terminate_shuts_down_a_paused_server(redis_server: RedisServer) -> None:
    redis_server.pause()
    redis_server.terminate(timeout=5)
    assert not redis_server.running


def test_requirepass_is_used_by_clients() -> None:
    with RedisServer(("--requirepass", "s3cret")) as server:
        assert server.client().ping() is True
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
        with pytest.raises(redis.AuthenticationError):
            server.client(password=None).get("key")


def test_stop_removes_directory_and_process() -> None:
    server = RedisServer().start()
    proc, directory = server.proc, server.dir
    assert proc is not None

    server.stop()

    assert proc.poll() is not None
    assert not directory.exists()


def test_start_moves_off_a_port_taken_by_another_process() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]

        pinned = RedisServer(port=taken)
        with pytest.raises(RuntimeError, match="could not bind"), pinned:
            pass
        assert not pinned.dir.exists()

        server = RedisServer()
        server.port = taken
        with server:
            assert server.port != taken
            assert server.client().ping() is True


def test_three_nodes_have_distinct_ports(redis_nodes3: RedisCluster) -> None:
    assert len(redis_nodes3) == 3
    assert len({server.port for server in redis_nodes3}) == 3
    assert all(client.ping() for client in redis_nodes3.clients())
    assert redis_nodes3.urls == [server.url for server in redis_nodes3]


def test_nodes_are_independent(redis_nodes: ClusterFactory) -> None:
    first, second = redis_nodes(2)
    first.client().set("key", "value")
    assert second.client().get("key") is None


def test_env_var_selects_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = find_redis_server()
    monkeypatch.setenv("DLOCK_REDIS_SERVER", binary)
    assert find_redis_server() == binary

    monkeypatch.setenv("DLOCK_REDIS_SERVER", os.devnull)
    with pytest.raises(RuntimeError, match="DLOCK_REDIS_SERVER"):
        find_redis_server()
