"""Bad input at the public boundaries: a clear error, and nothing lost.

What ``tests/test_redlock.py`` and ``tests/test_keys_and_settings.py``
already cover (bad keys, bad ttls on ``acquire``, malformed node URLs, bad
decorator options, most settings, unknown template fields at decoration,
unserialisable and huge arguments) is not repeated.  Added here: every
``dlock_*`` setting with a value of the wrong type, bad ttls on ``extend`` and
``keep``, non-UTF-8 text in the other string parameters, a key template that
cannot render at call time (in a worker), a Redis that requires AUTH, and
``rediss://`` against a local TLS redis-server (and against plain ports).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, states
from support.redis_servers import RedisServer
from support.stored import stored_owner, stored_token

from celery_dlock import ConfigurationError, LockBusy, LockUnavailable, Redlock, single_flight
from celery_dlock.celery.keys import KeySpec
from celery_dlock.celery.settings import Settings
from celery_dlock.testing.redis_process import HOST

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def app_with(**conf: Any) -> Celery:
    app = Celery("inputs", set_as_current=False)
    app.conf.update(conf)
    return app


# -- settings: every one, with a value of the wrong type ------------------------------------

#: Wrong values by the type of the setting's default, or by name where it defaults to None.
_WRONG: dict[type | str, list[Any]] = {
    tuple: [6379, b"redis://127.0.0.1:6379/0", [6379], {"url": "redis://x"}],
    str: [3, b"bytes", ["requeue"], True],
    float: ["30", True, float("nan"), float("-inf"), [1.0], -1.0],
    int: [1.5, "3", True, -1, [1]],
    bool: [1, 0, "yes", "false", [True]],
    "sentinel_master": [3, b"mymaster", ["mymaster"], True, ""],
    "transport_options": ["master_name=m", 3, [("master_name", "m")], True],
    "beat_scheduler": [3, b"celery.beat:PersistentScheduler", "celery.beat", "a b:C", ":Scheduler", True],
}


def _wrong_values() -> Iterator[Any]:
    for field in dataclasses.fields(Settings):
        name = Settings.PREFIX + field.name
        for value in _WRONG[field.name if field.default is None else type(field.default)]:
            if field.name == "beat_max_skew" and value == -1.0:
                continue
            yield pytest.param(name, value, id=f"{name}={value!r}")


@pytest.mark.parametrize(("name", "value"), list(_wrong_values()))
def test_every_setting_refuses_a_value_of_the_wrong_type(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_app(app_with(**{name: value}))


def test_beat_max_skew_refuses_a_negative_value() -> None:
    with pytest.raises(ConfigurationError, match="dlock_beat_max_skew"):
        Settings.from_app(app_with(dlock_beat_max_skew=-1.0))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://", "rediss://:pw@127.0.0.1:99999/0"])
def test_a_malformed_dlock_redis_url_is_refused_with_the_settings(url: str) -> None:
    with pytest.raises(ConfigurationError, match="dlock_redis_url"):
        Settings.from_app(app_with(dlock_redis_url=url))


def test_a_malformed_redis_url_fails_clearly_when_the_lock_is_made() -> None:
    """What happens today instead: the error comes when the Redlock is built."""
    with pytest.raises(ValueError, match="malformed Redis URL") as caught:
        Redlock(["redis://:hunter2@127.0.0.1:notaport/0"])
    assert "hunter2" not in str(caught.value)


# -- the lock core: ttls on extend and keep, non-UTF-8 strings -------------------------------


@pytest.mark.parametrize("ttl", [float("nan"), float("inf"), -1, 0, "5", True])
def test_bad_ttl_on_extend_and_keep_leaves_the_lock_held(redis_server: RedisServer, ttl: Any) -> None:
    redlock = Redlock([redis_server.url])
    lock = redlock.acquire("held", ttl=5)
    with pytest.raises((TypeError, ValueError), match="ttl"):
        lock.extend(ttl)
    with pytest.raises((TypeError, ValueError), match="seconds"):  # keep(seconds)
        lock.keep(ttl)
    assert not lock.lost and not lock.released
    assert redis_server.client().pttl("dlock:lock:held") > 4000
    assert lock.release() is True


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("retry_jitter", float("nan"), ValueError),
        ("retry_delay", "0.1", TypeError),
        ("drift_factor", -0.1, ValueError),
        ("socket_timeout", float("inf"), ValueError),
        ("extend_every", 1, ValueError),
        ("extend_every", 0, ValueError),
        ("retry_count", True, TypeError),
    ],
)
def test_more_bad_redlock_options_name_the_parameter(option: str, value: Any, error: type) -> None:
    with pytest.raises(error, match=option):
        Redlock(["redis://127.0.0.1:6390/0"], **{option: value})


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("timeout", -1, ValueError),
        ("timeout", float("nan"), ValueError),
        ("max_hold", 0, ValueError),
        ("on_lost", "callback", TypeError),
        ("label", 42, TypeError),
        ("owner_prefix", b"x", TypeError),
        ("owner_prefix", "worker\n1", ValueError),  # the owner is the stored lock's first line
    ],
)
def test_more_bad_acquire_arguments_name_the_parameter_and_touch_nothing(
    redis_server: RedisServer, option: str, value: Any, error: type
) -> None:
    redlock = Redlock([redis_server.url])
    with pytest.raises(error, match=option):
        redlock.acquire("k", ttl=1, **{option: value})
    assert redis_server.client().keys("dlock:lock:*") == []


@pytest.mark.parametrize("prefix", ["", "a\nb"])
def test_release_owner_refuses_a_prefix_that_could_match_another_owner(redis_server: RedisServer, prefix: str) -> None:
    redlock = Redlock([redis_server.url])
    lock = redlock.acquire("k", ttl=5, owner_prefix="a")
    with pytest.raises(ValueError, match="owner_prefix"):
        redlock.release_owner("k", prefix)
    assert redlock.holder("k") is not None and lock.release() is True


def test_a_non_utf8_label_is_stored_escaped(redis_server: RedisServer) -> None:
    redlock = Redlock([redis_server.url])
    with redlock.lock("k", ttl=5, label="bad\udcff") as lock:
        assert redlock.holder("k")["label"] == "bad\udcff"
    assert lock.released


@pytest.mark.parametrize("where", ["key_prefix", "owner_prefix", "count_as"])
def test_non_utf8_prefixes_are_refused_naming_the_parameter(redis_server: RedisServer, where: str) -> None:
    options = {where: "bad\udcff"}
    with pytest.raises(ValueError, match=where):
        if where == "key_prefix":
            Redlock([redis_server.url], **options).acquire("k", ttl=1)
        else:
            Redlock([redis_server.url]).acquire("k", ttl=1, **options)
    assert redis_server.client().keys("*lock:*") == []


def test_a_key_callable_returning_non_utf8_text_fails_at_acquire(redis_server: RedisServer) -> None:
    """Templates hash non-UTF-8 values; a callable's key is used as given, so the lock refuses it."""
    import inspect

    def job(name: str) -> None: ...

    spec = KeySpec(lambda name: name, task_name="job", signature=inspect.signature(job))
    for text in ("bad\udcff", "bad\udcff" * 100):  # short, and long enough to be hashed (its head is kept)
        with pytest.raises(ValueError, match="key: not encodable as UTF-8"):
            Redlock([redis_server.url]).acquire(spec.build((text,), {}), ttl=1)
    assert redis_server.client().keys("*") == []


# -- in a worker: a key that cannot render fails that task only -------------------------------------


def test_a_key_that_cannot_render_fails_the_task_and_nothing_else(celery_app: Celery, lock_server: RedisServer) -> None:
    from celery.contrib.testing.worker import start_worker

    @celery_app.task(shared=False)
    @single_flight(key="region:{region}")
    def job(**extra: Any) -> str:
        return "ran"

    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False):
        bad = job.delay()  # no 'region'
        good = job.delay(region="eu")
        bad.get(timeout=20, propagate=False)
        assert good.get(timeout=20) == "ran"
    assert bad.state == states.FAILURE
    assert isinstance(bad.result, TypeError)
    assert "region" in str(bad.result) and "job" in str(bad.result)
    assert lock_server.client().keys("dlock:lock:*") == []


# -- AUTH ------------------------------------------------------------------------------------------------


@pytest.fixture
def auth_server() -> Iterator[RedisServer]:
    with RedisServer(("--requirepass", "s3cret")) as server:
        yield server


@pytest.mark.parametrize("password", [None, "wrong"], ids=["no-password", "wrong-password"])
def test_a_redis_that_requires_auth_is_unavailable_fast_and_never_busy(
    auth_server: RedisServer, password: str | None
) -> None:
    auth = f":{password}@" if password else ""
    redlock = Redlock([f"redis://{auth}{HOST}:{auth_server.port}/0"], retry_count=3, retry_delay=0.01)
    started = time.monotonic()
    with pytest.raises(LockUnavailable) as caught:
        redlock.acquire("k", ttl=5)
    assert time.monotonic() - started < 2.0, "an AUTH failure must not hang"
    assert not isinstance(caught.value, LockBusy)
    assert caught.value.attempts == 4
    ((node, error),) = caught.value.errors
    assert isinstance(error, redis.AuthenticationError), error
    assert "AuthenticationError" in str(caught.value)
    assert "s3cret" not in str(caught.value) and (password is None or password not in node)
    assert auth_server.client().keys("*") == [], "nothing was written"


def test_the_right_password_locks(auth_server: RedisServer) -> None:
    redlock = Redlock([auth_server.url])
    with redlock.lock("k", ttl=5) as lock:
        assert stored_token(auth_server.client(), "dlock:lock:k") == lock.token
    assert "s3cret" not in redlock.nodes[0].name


def test_the_unavailable_message_says_why(auth_server: RedisServer) -> None:
    redlock = Redlock([f"redis://{HOST}:{auth_server.port}/0"], retry_count=0)
    with pytest.raises(LockUnavailable, match="Authentication required"):
        redlock.acquire("k", ttl=5)


# -- TLS ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates for a TLS redis-server")
    here = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=dlock test CA", cwd=here)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", f"/CN={HOST}", cwd=here)  # fmt: skip
    (here / "san.cnf").write_text(f"subjectAltName=IP:{HOST},DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.cnf", cwd=here)  # fmt: skip
    return Certs(here / "ca.crt", here / "server.crt", here / "server.key")


class TlsRedisServer(RedisServer):
    """A redis-server that speaks TLS only, on :attr:`port`."""

    def __init__(self, certs: Certs) -> None:
        self.certs = certs
        super().__init__()

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(self.certs.cert), "--tls-key-file", str(self.certs.key),
            "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("ssl", True)
        kwargs.setdefault("ssl_ca_certs", str(self.certs.ca))
        return super().client(**kwargs)

    @property
    def tls_url(self) -> str:
        return f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={self.certs.ca}"


@pytest.fixture(scope="module")
def tls_nodes(certs: Certs) -> Iterator[list[TlsRedisServer]]:
    """Three TLS-only nodes; skips if this redis-server was built without TLS."""
    servers: list[TlsRedisServer] = []
    try:
        for _ in range(3):
            server = TlsRedisServer(certs)
            servers.append(server)
            try:
                server.start()
            except RuntimeError as exc:
                if "tls" in str(exc).lower():
                    pytest.skip(f"this redis-server has no TLS support: {exc}")
                raise
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_rediss_urls_lock_over_tls(tls_nodes: list[TlsRedisServer]) -> None:
    redlock = Redlock([server.tls_url for server in tls_nodes])
    other = Redlock([server.tls_url for server in tls_nodes], retry_count=0)
    with redlock.lock("tls", ttl=5) as lock:
        with pytest.raises(LockBusy):
            other.acquire("tls", ttl=5, blocking=False)
        for server in tls_nodes:
            assert stored_owner(server.client(), "dlock:lock:tls") == lock.owner
    again = other.acquire("tls", ttl=5, blocking=False)
    assert again.token > lock.token
    assert again.release() is True
    unverified = Redlock([f"rediss://{HOST}:{s.port}/0?ssl_cert_reqs=none" for s in tls_nodes])
    unverified.acquire("tls", ttl=5, blocking=False).release()  # redis-py's TLS query options pass through
    settings = Settings.from_app(app_with(dlock_redis_url=[s.tls_url for s in tls_nodes]))
    assert all(url.startswith("rediss://") for url in settings.redis_url)


def test_rediss_with_an_untrusted_certificate_fails_cleanly(tls_nodes: list[TlsRedisServer]) -> None:
    redlock = Redlock([f"rediss://{HOST}:{s.port}/0" for s in tls_nodes], retry_count=1, retry_delay=0.01)
    started = time.monotonic()
    with pytest.raises(LockUnavailable) as caught:
        redlock.acquire("untrusted", ttl=5)
    assert time.monotonic() - started < 3.0
    assert not isinstance(caught.value, LockBusy)
    assert len(caught.value.errors) == 3
    assert all("CERTIFICATE_VERIFY_FAILED" in str(error) for _, error in caught.value.errors)
    assert all(s.client().keys("dlock:lock:*") == [] for s in tls_nodes)


def test_plain_redis_against_a_tls_port_fails_cleanly(tls_nodes: list[TlsRedisServer]) -> None:
    redlock = Redlock([f"redis://{HOST}:{s.port}/0" for s in tls_nodes], retry_count=1, retry_delay=0.01)
    started = time.monotonic()
    with pytest.raises(LockUnavailable) as caught:
        redlock.acquire("plain", ttl=5)
    assert time.monotonic() - started < 3.0
    assert not isinstance(caught.value, LockBusy)
    assert all(s.client().keys("dlock:lock:*") == [] for s in tls_nodes)


def test_rediss_against_a_plain_port_fails_cleanly(redis_server: RedisServer) -> None:
    """Runs whatever the build: TLS spoken to a server that does not speak it."""
    redlock = Redlock([f"rediss://{HOST}:{redis_server.port}/0"], retry_count=1, retry_delay=0.01)
    started = time.monotonic()
    with pytest.raises(LockUnavailable) as caught:
        redlock.acquire("tls-to-plain", ttl=5)
    assert time.monotonic() - started < 3.0, "a TLS handshake with a plain server must not hang"
    assert not isinstance(caught.value, LockBusy)
    assert isinstance(caught.value.errors[0][1], (redis.ConnectionError, redis.TimeoutError))
    assert redis_server.client().keys("*") == []


def test_a_tls_node_is_named_rediss() -> None:
    assert Redlock([f"rediss://{HOST}:6390/0"]).nodes[0].name.startswith("rediss://")
