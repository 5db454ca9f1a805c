"""Configuration: precedence, defaults, and an error naming the key for
every mistake, at start-up.
"""

from __future__ import annotations

import re
import typing as t
import warnings
from datetime import timedelta

import pytest
from flask import Flask

from flask_ploints import ConfigError
from flask_ploints import PlointsWarning
from flask_ploints import PlointsWebhooks
from flask_ploints._config import DEFAULTS
from flask_ploints.stores import MemoryStore
from flask_ploints.stores import NullStore

from .support import SECRET


def _app(**config: object) -> Flask:
    app = Flask("config_test")
    app.testing = True
    app.config.update(config)
    return app


def test_defaults_are_set_once_with_setdefault() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_WEBHOOK_URL="/custom")
    PlointsWebhooks(app)
    assert app.config["PLOINTS_WEBHOOK_URL"] == "/custom"
    assert app.config["PLOINTS_DEDUPE_STORE"] == "memory"
    assert app.config["PLOINTS_DEDUPE_RETENTION"] == timedelta(days=7)
    assert app.config["PLOINTS_WEBHOOK_MAX_BYTES"] == 1024 * 1024
    receiver = app.extensions["ploints"]["ploints"]
    assert receiver.settings.url == "/custom"
    assert receiver.settings.retention == 7 * 86400
    assert receiver.settings.secrets == (SECRET,)
    assert isinstance(receiver.store, MemoryStore)


def test_keyword_arguments_override_config() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET="whsec_config", PLOINTS_WEBHOOK_URL="/config")
    PlointsWebhooks(app, secret="whsec_argument", url="/argument", retention=86400, store=None)
    settings = app.extensions["ploints"]["ploints"].settings
    assert settings.secrets == ("whsec_argument",)
    assert settings.url == "/argument"
    assert settings.retention == 86400
    assert isinstance(app.extensions["ploints"]["ploints"].store, NullStore)


def test_init_app_later_and_on_several_apps() -> None:
    webhooks = PlointsWebhooks(secret=SECRET)
    first, second = _app(), _app()
    webhooks.init_app(first)
    webhooks.init_app(second)
    assert webhooks.receiver(first).store is not webhooks.receiver(second).store
    with first.app_context():
        assert webhooks.receiver() is first.extensions["ploints"]["ploints"]


def test_receiver_without_init_app_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"did you forget to call init_app\(app\)\?"):
        PlointsWebhooks().receiver(_app())


def test_registering_twice_is_refused() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET)
    webhooks = PlointsWebhooks(app)
    with pytest.raises(RuntimeError, match="already registered"):
        webhooks.init_app(app)


def test_two_instances_need_their_own_url() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET)
    PlointsWebhooks(app)
    with pytest.raises(
        ConfigError, match="PLOINTS_WEBHOOK_URL '/webhooks/ploints' is used by another"
    ):
        PlointsWebhooks(app, name="b")


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        PlointsWebhooks(secrett=SECRET)


MISTAKES = {
    "secret_none": ({"PLOINTS_WEBHOOK_SECRET": None}, "PLOINTS_WEBHOOK_SECRET is not set"),
    "secret_empty": ({"PLOINTS_WEBHOOK_SECRET": ""}, "PLOINTS_WEBHOOK_SECRET is not set"),
    "secret_empty_list": ({"PLOINTS_WEBHOOK_SECRET": []}, "PLOINTS_WEBHOOK_SECRET is not set"),
    "secret_list_with_blank": (
        {"PLOINTS_WEBHOOK_SECRET": [SECRET, ""]},
        "PLOINTS_WEBHOOK_SECRET must be a string or a list of strings, none empty or only whitespace",
    ),
    "secret_whitespace": (
        {"PLOINTS_WEBHOOK_SECRET": " \t\n"},
        "PLOINTS_WEBHOOK_SECRET must be a string or a list of strings, none empty or only whitespace",
    ),
    "secret_lone_surrogate": (
        {"PLOINTS_WEBHOOK_SECRET": [SECRET, "whsec_\udc80"]},
        "PLOINTS_WEBHOOK_SECRET is not valid UTF-8 (a lone surrogate)",
    ),
    "secret_bytes": ({"PLOINTS_WEBHOOK_SECRET": b"whsec"}, "PLOINTS_WEBHOOK_SECRET must be"),
    "url_relative": ({"PLOINTS_WEBHOOK_URL": "hooks"}, "PLOINTS_WEBHOOK_URL must be a path"),
    "retention_text": (
        {"PLOINTS_DEDUPE_RETENTION": "7d"},
        "PLOINTS_DEDUPE_RETENTION must be a number",
    ),
    "retention_short": (
        {"PLOINTS_DEDUPE_RETENTION": 3600},
        "PLOINTS_DEDUPE_RETENTION must exceed the sender's retry span of 52560 s",
    ),
    "lease_zero": ({"PLOINTS_CLAIM_LEASE": 0}, "PLOINTS_CLAIM_LEASE must be positive"),
    "lease_under_the_sender_timeout": (
        {"PLOINTS_CLAIM_LEASE": 9.5},
        "PLOINTS_CLAIM_LEASE must be at least the sender's 10 s timeout",
    ),
    "max_bytes_float": (
        {"PLOINTS_WEBHOOK_MAX_BYTES": 1.5},
        "PLOINTS_WEBHOOK_MAX_BYTES must be a positive",
    ),
    "max_age_short": ({"PLOINTS_MAX_EVENT_AGE": 60}, "PLOINTS_MAX_EVENT_AGE must exceed"),
    "share_too_big": ({"PLOINTS_SLOW_HANDLER_SHARE": 2}, "PLOINTS_SLOW_HANDLER_SHARE must be"),
    "store_unknown": (
        {"PLOINTS_DEDUPE_STORE": "mongo"},
        "PLOINTS_DEDUPE_STORE: unknown store 'mongo'",
    ),
    "store_unknown_scheme_with_password": (
        {"PLOINTS_DEDUPE_STORE": "mongodb://app:hunter2@db/0"},
        "PLOINTS_DEDUPE_STORE: unknown store 'mongodb://app:***@db/0'",
    ),
    "store_unknown_sql_driver": (
        {"PLOINTS_DEDUPE_STORE": "postgresql+nodriver://app:hunter2@db/app"},
        "PLOINTS_DEDUPE_STORE: cannot use 'postgresql+nodriver://app:***@db/app': NoSuchModuleError",
    ),
    "sql_table_too_long": (
        {"PLOINTS_SQL_TABLE": "t" * 46},
        "PLOINTS_SQL_TABLE must be at most 45 characters",
    ),
    "store_number": ({"PLOINTS_DEDUPE_STORE": 3}, "PLOINTS_DEDUPE_STORE must be a store"),
    "store_bad_import": (
        {"PLOINTS_DEDUPE_STORE": "no_such_module.Store"},
        "PLOINTS_DEDUPE_STORE: cannot import 'no_such_module.Store'",
    ),
    "dispatch_unknown": ({"PLOINTS_DISPATCH": "threads"}, "PLOINTS_DISPATCH must be"),
    "memory_bound": (
        {"PLOINTS_MEMORY_STORE_MAX_ENTRIES": 0},
        "PLOINTS_MEMORY_STORE_MAX_ENTRIES must be a positive integer",
    ),
}


@pytest.mark.parametrize("config, message", MISTAKES.values(), ids=MISTAKES.keys())
def test_mistakes_fail_at_start_naming_the_key(config: dict[str, object], message: str) -> None:
    app = _app(**{"PLOINTS_WEBHOOK_SECRET": SECRET, **config})
    with pytest.raises(ConfigError) as info:
        PlointsWebhooks(app)
    assert str(info.value).startswith(message)
    assert "ploints" not in app.extensions or not app.extensions["ploints"]


def test_retention_under_a_day_warns() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_DEDUPE_RETENTION=timedelta(hours=20))
    with pytest.warns(PlointsWarning, match="PLOINTS_DEDUPE_RETENTION is under 24 hours"):
        PlointsWebhooks(app)


def test_memory_store_warns_outside_testing() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET)
    app.testing = False
    with pytest.warns(PlointsWarning, match="dedupes within one process only"):
        PlointsWebhooks(app)


def test_memory_store_is_quiet_in_testing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PlointsWebhooks(_app(PLOINTS_WEBHOOK_SECRET=SECRET))


def test_store_instance_and_import_path() -> None:
    _factory_calls.clear()
    store = MemoryStore(max_entries=5)
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_DEDUPE_STORE=store)
    PlointsWebhooks(app)
    assert app.extensions["ploints"]["ploints"].store is store
    other = _app(
        PLOINTS_WEBHOOK_SECRET=SECRET,
        PLOINTS_DEDUPE_STORE="tests.test_config:make_store",
        SECRET_KEY="not for stores",
    )
    PlointsWebhooks(other, redis_prefix="from-argument:")
    assert other.extensions["ploints"]["ploints"].store.max_entries == 7
    # The factory gets the instance's PLOINTS_* keys, keyword overrides
    # applied, and nothing else of the app's config.
    [config] = _factory_calls
    assert set(config) == set(DEFAULTS)
    assert config["PLOINTS_REDIS_PREFIX"] == "from-argument:"


_factory_calls: list[t.Mapping[str, object]] = []


def make_store(config: t.Mapping[str, object]) -> MemoryStore:
    _factory_calls.append(config)
    return MemoryStore(max_entries=7)


def test_missing_secret_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^PLOINTS_WEBHOOK_SECRET is not set"):
        PlointsWebhooks(_app())


def test_store_options_take_keyword_overrides() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_MEMORY_STORE_MAX_ENTRIES=9)
    PlointsWebhooks(app, memory_store_max_entries=5)
    assert app.extensions["ploints"]["ploints"].store.max_entries == 5


@pytest.mark.parametrize("key", ["PLOINTS_REDIS_PREFIX", "PLOINTS_SQL_TABLE"])
def test_store_names_must_be_strings(key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key} must be a non-empty string"):
        PlointsWebhooks(_app(PLOINTS_WEBHOOK_SECRET=SECRET, **{key: ""}))


def test_the_documented_options_are_the_config_keys_arguments() -> None:
    doc = PlointsWebhooks.__doc__ or ""
    section = doc[doc.index(":param options:") : doc.index(":raises")]
    documented = set(re.findall(r"``(\w+)``", section))
    assert documented == {argument for argument, _ in DEFAULTS.values()}


@pytest.mark.parametrize(
    "config",
    [
        {"PLOINTS_DEDUPE_STORE": "mongodb://app:hunter2@db/0"},
        {"PLOINTS_DEDUPE_STORE": "postgresql+nodriver://app:hunter2@db/app"},
        {"PLOINTS_METRICS": "https://metrics:hunter2@push.example"},
        {"PLOINTS_WEBHOOK_SECRET": ["whsec_hunter2", "whsec_\udc80"]},
    ],
)
def test_config_errors_never_quote_secrets(config: dict[str, object]) -> None:
    app = _app(**{"PLOINTS_WEBHOOK_SECRET": SECRET, **config})
    with pytest.raises(ConfigError) as info:
        PlointsWebhooks(app)
    assert "hunter2" not in str(info.value)
    assert SECRET not in str(info.value)


def test_secrets_stay_out_of_reprs() -> None:
    app = _app(
        PLOINTS_WEBHOOK_SECRET=["whsec_hunter2", "whsec_old_hunter3"],
        PLOINTS_DEDUPE_STORE=None,
    )
    webhooks = PlointsWebhooks(app)
    receiver = webhooks.receiver(app)
    for text in (repr(receiver), repr(receiver.settings), repr(webhooks)):
        assert "hunter" not in text


def test_max_event_age_follows_the_retention_by_default() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_DEDUPE_RETENTION=timedelta(days=3))
    assert PlointsWebhooks(app).receiver(app).settings.max_event_age == 3 * 86400


def test_max_event_age_false_turns_the_check_off() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_MAX_EVENT_AGE=False)
    assert PlointsWebhooks(app).receiver(app).settings.max_event_age is None


def test_max_event_age_past_the_retention_warns() -> None:
    app = _app(PLOINTS_WEBHOOK_SECRET=SECRET, PLOINTS_MAX_EVENT_AGE=timedelta(days=30))
    with pytest.warns(
        PlointsWarning, match="^PLOINTS_MAX_EVENT_AGE is longer than PLOINTS_DEDUPE_RETENTION"
    ):
        PlointsWebhooks(app)
