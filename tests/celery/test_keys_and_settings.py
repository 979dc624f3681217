"""Keys, options and settings: checked at decoration, finalize and call time."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import pytest
from celery import Celery

from celery_dlock import ConfigurationError, SingleFlightTask, single_flight
from celery_dlock.celery.keys import MAX_KEY_LENGTH, MAX_VALUE_LENGTH, KeySpec
from celery_dlock.celery.options import SingleFlightOptions
from celery_dlock.celery.settings import LockAddress, Settings, lock_address


def spec_for(function: Any, key: Any = None) -> KeySpec:
    import inspect

    return KeySpec(key, task_name="proj.task", signature=inspect.signature(function))


def charge(account_id: int, amount: int = 1, *, note: str = "") -> None: ...


# -- argument-hash keys ------------------------------------------------------------


def test_hash_key_is_the_same_for_positional_keyword_and_default() -> None:
    spec = spec_for(charge)
    key = spec.build((1,), {})
    assert key == spec.build((), {"account_id": 1})
    assert key == spec.build((1, 1), {"note": ""})
    assert key != spec.build((2,), {})
    assert key.startswith("proj.task:") and len(key) == len("proj.task:") + 64


def test_hash_key_serialises_uuid_datetime_and_decimal() -> None:
    spec = spec_for(charge)
    ident = uuid.UUID(int=7)
    when = datetime.datetime(2026, 11, 26, 12, 0)
    first = spec.build((ident,), {"note": when, "amount": decimal.Decimal("1.50")})
    assert first == spec.build((ident,), {"amount": decimal.Decimal("1.50"), "note": when})
    assert first != spec.build((ident,), {"amount": decimal.Decimal("1.51"), "note": when})


def test_hash_key_of_unserialisable_arguments_names_the_task() -> None:
    with pytest.raises(TypeError, match=r"proj\.task.*cannot be serialised"):
        spec_for(charge).build((object(),), {})


def test_hash_key_of_huge_arguments_stays_bounded() -> None:
    key = spec_for(charge).build(("x" * 1_000_000,), {})
    assert len(key) < 100


def test_wrong_arguments_are_reported_for_the_task() -> None:
    with pytest.raises(TypeError, match=r"proj\.task.*bind"):
        spec_for(charge).build((1, 2, 3), {})


# -- template keys -------------------------------------------------------------------


def test_template_key_renders_named_arguments_and_defaults() -> None:
    spec = spec_for(charge, "ledger:{account_id}:{amount}")
    assert spec.build((42,), {}) == "ledger:42:1"
    assert spec.build((), {"account_id": 42, "amount": 5}) == "ledger:42:5"


def test_template_hashes_long_and_non_utf8_values() -> None:
    spec = spec_for(charge, "ledger:{account_id}")
    long_key = spec.build(("y" * 10_000,), {})
    assert long_key.startswith("ledger:#") and len(long_key) == len("ledger:#") + 64
    assert len(long_key) < MAX_VALUE_LENGTH + 20
    assert spec.build(("bad\udcff",), {}).startswith("ledger:#")
    assert spec.build(("a" * MAX_VALUE_LENGTH,), {}) == "ledger:" + "a" * MAX_VALUE_LENGTH


def test_template_naming_an_unknown_argument_fails_at_decoration() -> None:
    with pytest.raises(ValueError, match=r"charge.*'acount_id'"):

        @single_flight(key="ledger:{acount_id}")
        def charge(account_id: int) -> None: ...


def test_template_check_runs_when_the_base_class_task_is_created() -> None:
    app = Celery("check", set_as_current=False)
    with pytest.raises(ValueError, match="'missing'"):

        @app.task(shared=False, base=SingleFlightTask, single_flight={"key": "k:{missing}"}, lazy=False)
        def job(present: int) -> None: ...


def test_template_may_use_attributes_and_kwargs_catch_all() -> None:
    def job(order: Any, **extra: Any) -> None: ...

    spec = spec_for(job, "order:{order.id}:{region}")

    class Order:
        id = 9

    assert spec.build((Order(),), {"region": "eu"}) == "order:9:eu"


def test_positional_template_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="positional"):
        spec_for(charge, "ledger:{0}")


def test_callable_key_gets_the_task_arguments() -> None:
    spec = spec_for(charge, lambda account_id, amount=1, note="": f"acct-{account_id}")
    assert spec.build((3,), {"amount": 2}) == "acct-3"
    assert len(spec_for(charge, lambda *a, **k: "z" * 5000).build((1,), {})) <= MAX_KEY_LENGTH
    with pytest.raises(TypeError, match="non-empty str"):
        spec_for(charge, lambda *a, **k: 42).build((1,), {})


def test_key_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match="key"):
        spec_for(charge, 42)


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"on_busy": "later"}, "on_busy"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": "30"}, "ttl"),
        ({"max_requeues": -1}, "max_requeues"),
        ({"wait_fallback": "wait"}, "wait_fallback"),
        ({"fail_mode": "ajar"}, "fail_mode"),
        ({"limit": 0}, "limit"),
        ({"limit": 2.5}, "limit"),
        ({"limit": 3, "on_busy": "queue"}, "limit=3 cannot be combined with on_busy='queue'"),
        ({"limit": 2, "on_busy": "coalesce"}, "limit=2 cannot be combined with on_busy='coalesce'"),
        ({"limit": 2, "scope": "queue"}, "limit: scope='queue' takes no lock while the body runs"),
    ],
)
def test_bad_decorator_options_fail_at_decoration_naming_the_option(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        single_flight(**options)


def test_unknown_decorator_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ttll"):
        single_flight(ttll=3)  # type: ignore[call-overload]


def test_unknown_base_class_option_names_the_task() -> None:
    with pytest.raises(TypeError, match=r"ttll.*'job'"):
        SingleFlightOptions.coerce({"ttll": 3}, task_name="job")


def test_decorating_twice_is_refused() -> None:
    @single_flight(key="a")
    def job() -> None: ...

    with pytest.raises(TypeError, match="already"):
        single_flight(key="b")(job)


# -- settings ----------------------------------------------------------------------------


def app_with(**conf: Any) -> Celery:
    app = Celery("settings", set_as_current=False)
    app.conf.update(conf)
    return app


def test_defaults_and_the_derived_lock_address() -> None:
    settings = Settings.from_app(app_with(broker_url="redis://b:1/2"))
    assert settings.redis_url == ("redis://b:1/2",)
    assert settings.on_busy == "requeue" and settings.fail_mode == "closed"
    assert lock_address(app_with(broker_url="redis://b:1/2").conf) == LockAddress(("redis://b:1/2",), "broker_url")
    fallback = app_with(broker_url="amqp://guest@localhost//", result_backend="redis://r:3/4")
    assert Settings.from_app(fallback).redis_url == ("redis://r:3/4",)
    assert lock_address(fallback.conf) == LockAddress(("redis://r:3/4",), "result_backend")
    assert Settings.from_app(app_with(dlock_redis_url=["redis://a:1", "redis://b:1", "redis://c:1"])).redis_url == (
        "redis://a:1",
        "redis://b:1",
        "redis://c:1",
    )
    explicit = app_with(dlock_redis_url="unix:///tmp/r.sock", broker_url="redis://b:1/2")
    assert lock_address(explicit.conf) == LockAddress(("unix:///tmp/r.sock",), "dlock_redis_url")
    sentinel = app_with(
        broker_url="sentinel://s1:26379;sentinel://s2:26379/3",
        broker_transport_options={"master_name": "m1", "sentinel_kwargs": {"password": "x"}},
    )
    assert lock_address(sentinel.conf) == LockAddress(
        ("sentinel://s1:26379;sentinel://s2:26379/3",), "broker_url", "m1", {"password": "x"}
    )
    named = app_with(dlock_redis_url="sentinel://s1:26379", dlock_sentinel_master="m2")
    assert Settings.from_app(named).sentinel_master == "m2"
    assert Settings.from_app(app_with(DLOCK_ON_BUSY="skip", broker_url="rediss://b:1/5")).on_busy == "skip"


@pytest.mark.parametrize(
    "conf",
    [
        {"broker_url": "sentinel://s1:26379;sentinel://s2:26379"},
        {"dlock_redis_url": "sentinel://s1:26379"},
        {"broker_url": "amqp://", "result_backend": "sentinel://s1:26379"},
    ],
)
def test_a_sentinel_lock_url_without_its_master_name_is_refused(conf: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"master_name|dlock_sentinel_master"):
        Settings.from_app(app_with(**conf))


@pytest.mark.parametrize(
    ("conf", "shown"),
    [
        pytest.param({}, "broker_url is unset", id="nothing-set"),
        pytest.param({"broker_url": "redis://h1:6379/0;sentinel://s2:26379"}, "sentinel://", id="mixed-failover"),
        pytest.param({"broker_url": "redis+socket:///tmp/redis.sock"}, "redis+socket://", id="socket-broker"),
        pytest.param({"broker_url": "redis://h1:6379/10;redis://h2:6379/10"}, "h2:6379/10", id="failover-broker"),
        pytest.param({"broker_url": ["redis://h1:6379/1", "redis://h2:6379/1"]}, "a list of URLs", id="broker-list"),
        pytest.param({"broker_url": "amqp://guest@localhost//", "result_backend": "rpc://"}, "rpc://", id="amqp-rpc"),
        pytest.param({"broker_url": "memory://"}, "result_backend=None", id="memory-no-backend"),
        pytest.param({"broker_url": "redis://:hunter2@h:6379/0;redis://h2"}, "***", id="password-masked"),
    ],
)
def test_a_lock_address_that_is_not_exact_is_refused_naming_dlock_redis_url(conf: dict[str, Any], shown: str) -> None:
    with pytest.raises(ConfigurationError, match="dlock_redis_url is not set") as caught:
        Settings.from_app(app_with(**conf))
    assert shown in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "localhost:6379/0" not in str(caught.value).split("such as")[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dlock_redis_url", "http://x"),
        ("dlock_redis_url", []),
        ("dlock_redis_url", 6379),
        ("dlock_key_prefix", 3),
        ("dlock_default_ttl", -1),
        ("dlock_default_ttl", "30"),
        ("dlock_on_busy", "later"),
        ("dlock_fail_mode", True),
        ("dlock_max_requeues", 1.5),
        ("dlock_requeue_delay", 0),
        ("dlock_wait_timeout", float("inf")),
        ("dlock_wait_fallback", "wait"),
        ("dlock_socket_timeout", -2),
    ],
)
def test_bad_setting_is_named(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_app(app_with(**{name: value}))


def test_a_default_limit_refuses_the_handoff_queue_naming_both_settings() -> None:
    with pytest.raises(ConfigurationError, match=r"dlock_default_limit \(3\) cannot be combined with dlock_on_busy"):
        Settings.from_app(app_with(dlock_default_limit=3, dlock_on_busy="queue"))
    with pytest.raises(ConfigurationError, match="dlock_default_limit"):
        Settings.from_app(app_with(dlock_default_limit=0))


def test_a_task_limit_refuses_the_app_wide_handoff_queue_at_worker_start() -> None:
    settings = Settings.from_app(app_with(dlock_redis_url="redis://h:1/0", dlock_on_busy="queue"))
    with pytest.raises(ConfigurationError, match="limit=2 cannot be combined with dlock_on_busy='queue'"):
        SingleFlightOptions(limit=2).resolve(settings)
    assert SingleFlightOptions(limit=2, on_busy="requeue").resolve(settings).limit == 2
    limited = Settings.from_app(app_with(dlock_redis_url="redis://h:1/0", dlock_default_limit=4))
    assert SingleFlightOptions().resolve(limited).limit == 4


def test_requeue_delays_must_be_ordered() -> None:
    with pytest.raises(ConfigurationError, match="dlock_requeue_max_delay"):
        Settings.from_app(app_with(dlock_requeue_delay=10, dlock_requeue_max_delay=1))


def test_settings_names_cover_every_field() -> None:
    assert "dlock_redis_url" in Settings.names() and "dlock_wait_fallback" in Settings.names()
