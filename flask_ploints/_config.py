"""Configuration keys, their defaults, and the checks made at start-up; and
what the sender, Ploints, documents about its deliveries (how long it waits
for an answer and when it retries), which the checks, the endpoint's
messages and ``flask ploints simulate`` all take from here.

Each setting can come from three places, first found wins: a keyword argument
to :class:`~flask_ploints.PlointsWebhooks`, the app's config key, the
default. Every mistake is reported by :func:`load_settings` when the app
starts, in a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import math
import typing as t
import warnings
from dataclasses import dataclass
from dataclasses import field
from datetime import timedelta
from types import MappingProxyType
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

from ._accounts import Accounts
from ._accounts import check_lookup
from ._errors import ConfigError
from ._errors import PlointsWarning

__all__ = [
    "DEFAULTS",
    "DELIVERY_LOG_DEFAULTS",
    "SENDER_RETRY_SCHEDULE",
    "SENDER_RETRY_SPAN",
    "SENDER_TIMEOUT",
    "CelerySettings",
    "ConfigError",
    "PlointsWarning",
    "Settings",
    "load_settings",
    "redact",
]

#: Seconds the sender waits for an answer before it counts a timeout and
#: retries.
SENDER_TIMEOUT = 10.0

#: Seconds before each of the sender's attempts, counted from the one
#: before: the first delivery, then the five retries (+1 min, +5 min,
#: +30 min, +2 h, +12 h). After the last the event is marked failed and can
#: only be resent by hand.
SENDER_RETRY_SCHEDULE: tuple[int, ...] = (0, 60, 5 * 60, 30 * 60, 2 * 3600, 12 * 3600)

#: Seconds from a first delivery to the sender's last retry (about 14.6 h).
SENDER_RETRY_SPAN = sum(SENDER_RETRY_SCHEDULE)

#: The longest ``PLOINTS_SQL_TABLE``: its longest index name,
#: ``ix_<table>_status_updated`` on databases without partial indexes, must
#: fit in 63 characters.
MAX_TABLE_NAME = 63 - len("ix__status_updated")

# PLOINTS_TRACE_CONTEXT: a delivery's trace starts fresh, or joins the one
# the request carried in.
_TRACE_CONTEXTS = ("fresh", "join")

#: Every key with its default, and the keyword argument that overrides it.
DEFAULTS: dict[str, tuple[str, t.Any]] = {
    "PLOINTS_WEBHOOK_SECRET": ("secret", None),
    "PLOINTS_WEBHOOK_URL": ("url", "/webhooks/ploints"),
    "PLOINTS_DEDUPE_STORE": ("store", "memory"),
    "PLOINTS_DEDUPE_NAMESPACE": ("namespace", None),
    "PLOINTS_DEDUPE_RETENTION": ("retention", timedelta(days=7)),
    "PLOINTS_CLAIM_LEASE": ("lease", timedelta(seconds=30)),
    "PLOINTS_DISPATCH": ("dispatch", "sync"),
    "PLOINTS_WEBHOOK_MAX_BYTES": ("max_bytes", 1024 * 1024),
    "PLOINTS_REQUIRE_HTTPS": ("require_https", False),
    "PLOINTS_MAX_EVENT_AGE": ("max_event_age", None),
    "PLOINTS_SLOW_HANDLER_SHARE": ("slow_handler_share", 0.5),
    "PLOINTS_MEMORY_STORE_MAX_ENTRIES": ("memory_store_max_entries", 100_000),
    "PLOINTS_REDIS_PREFIX": ("redis_prefix", "ploints:"),
    "PLOINTS_METRICS": ("metrics", False),
    "PLOINTS_OPENTELEMETRY": ("opentelemetry", False),
    "PLOINTS_TRACE_CONTEXT": ("trace_context", "fresh"),
    "PLOINTS_SQL_TABLE": ("sql_table", "ploints_events"),
    "PLOINTS_SQL_TIMEOUT": ("sql_timeout", 2.0),
    "PLOINTS_CELERY_APP": ("celery_app", None),
    "PLOINTS_CELERY_QUEUE": ("celery_queue", None),
    "PLOINTS_CELERY_LEASE": ("celery_lease", timedelta(hours=1)),
    "PLOINTS_CELERY_PUBLISH_TIMEOUT": ("celery_publish_timeout", 2.0),
    "PLOINTS_CELERY_MAX_RETRIES": ("celery_max_retries", 5),
    "PLOINTS_CELERY_RETRY_BACKOFF": ("celery_retry_backoff", 10.0),
    "PLOINTS_CELERY_RETRY_BACKOFF_MAX": ("celery_retry_backoff_max", 600.0),
}


#: The delivery log page's keys with their defaults. They are per app, not
#: per instance: one page lists the deliveries of every instance, so they
#: have no keyword argument. See :mod:`flask_ploints.admin`.
DELIVERY_LOG_DEFAULTS: dict[str, t.Any] = {
    "PLOINTS_DELIVERY_LOG": None,
    "PLOINTS_DELIVERY_LOG_URL": "/ploints/deliveries",
    "PLOINTS_DELIVERY_LOG_ACCESS": None,
    "PLOINTS_DELIVERY_LOG_RETENTION": timedelta(days=7),
    "PLOINTS_DELIVERY_LOG_TIMEOUT": 1.0,
}


@dataclass(frozen=True)
class CelerySettings:
    """The checked ``PLOINTS_CELERY_*`` settings of one instance, for
    :mod:`flask_ploints._celery`.

    .. versionadded:: 0.1
    """

    #: The Celery app from ``PLOINTS_CELERY_APP``; ``None`` to take
    #: ``app.extensions["celery"]``.
    app: object
    #: The queue events are sent to; ``None`` for Celery's own routing.
    queue: str | None
    #: Seconds of lease that cover an event's wait in the queue, one run of
    #: its handlers and the pause before its next retry.
    lease: float
    #: Seconds each step of publishing (connect, send, confirm) may take.
    publish_timeout: float
    #: Retries after the first attempt before the event is marked failed.
    max_retries: int
    #: Seconds before the first retry; each next retry waits twice as long.
    retry_backoff: float
    #: The longest wait between two attempts, in seconds.
    retry_backoff_max: float

    def retry_delay(self, retries: int) -> float:
        """Return the seconds to wait before the retry that follows
        ``retries`` earlier retries: :attr:`retry_backoff` doubled each
        time, at most :attr:`retry_backoff_max`.
        """
        # The exponent is capped: past 2**64 every wait is the maximum anyway.
        return min(self.retry_backoff_max, self.retry_backoff * 2.0 ** min(retries, 64))


@dataclass(frozen=True)
class Settings:
    """The checked settings of one :class:`~flask_ploints.PlointsWebhooks`
    instance on one app.
    """

    #: Every key's value after overrides, for stores and dispatchers that
    #: read their own options.
    values: t.Mapping[str, t.Any] = field(repr=False)
    #: Accepted secrets; the first is the current one, used for signing.
    #: Empty on an endpoint for many accounts, which has :attr:`accounts`.
    secrets: tuple[str, ...] = field(repr=False)
    url: str
    #: The raw ``PLOINTS_DEDUPE_STORE`` value, resolved by the extension;
    #: left out of the ``repr``, since a URL may hold a password.
    store: object = field(repr=False)
    #: What keeps this instance's ids apart from another's in a shared
    #: store; ``None`` for the instance's name ("" for the default one).
    namespace: str | None
    retention: float
    lease: float
    max_bytes: int
    require_https: bool
    max_event_age: float | None
    #: Handlers slower than this many seconds log a warning.
    slow_handler_seconds: float
    #: ``"sync"``, ``"celery"``, or a dispatcher instance.
    dispatch: object
    #: The ``PLOINTS_CELERY_*`` settings, used when :attr:`dispatch` is
    #: ``"celery"``.
    celery: CelerySettings
    #: The accounts' secrets of an endpoint for many accounts (a URL with
    #: ``<account>``, a lookup function as secret); ``None`` for one.
    accounts: Accounts | None = field(default=None, repr=False)

    def secrets_of(self, account: str | None) -> tuple[str, ...] | None:
        """Return the secrets of ``account`` (``None``: this endpoint's
        own), the current one first; ``None`` for an unknown account.

        :raises SecretLookupError: the lookup failed.
        """
        if self.accounts is None:
            return self.secrets
        if account is None:
            return None
        return self.accounts.secrets(account)


def parse_seconds(key: str, value: object, *, allow_none: bool = False) -> float | None:
    """The seconds of a duration setting: a number or a :class:`~datetime.timedelta`,
    positive and finite (or ``None`` when ``allow_none``).

    :raises ConfigError: naming ``key``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"{key} must be a number of seconds or a timedelta, not {value!r}")
    if not 0 < seconds < math.inf:
        raise ConfigError(f"{key} must be positive and finite, not {value!r}")
    return seconds


def _secrets(value: object) -> tuple[str, ...]:
    key = "PLOINTS_WEBHOOK_SECRET"
    if value is None or value == "" or value == [] or value == ():
        raise ConfigError(f"{key} is not set: set it to the secret Ploints gave for this endpoint")
    secrets = (value,) if isinstance(value, str) else value
    if not isinstance(secrets, (list, tuple)) or not all(
        isinstance(secret, str) and secret.strip() for secret in secrets
    ):
        raise ConfigError(
            f"{key} must be a string or a list of strings, none empty or only whitespace"
        )
    for secret in secrets:
        try:
            secret.encode("utf-8")
        except UnicodeEncodeError:
            # Said without the secret: it is signed as UTF-8, which a lone
            # surrogate cannot be, so every delivery would fail.
            raise ConfigError(f"{key} is not valid UTF-8 (a lone surrogate)") from None
    return tuple(secrets)


def redact(value: object) -> str:
    """Return ``value`` as a config error may quote it: a URL without its
    password, anything else that is not a plain name by its type only.

    .. versionadded:: 0.2
    """
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            value = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        return repr(value)
    if isinstance(value, str) and len(value) <= 64 and value.isprintable():
        return repr(value)
    return f"a {type(value).__name__}"


def _celery_settings(get: t.Callable[[str], t.Any]) -> CelerySettings:
    queue = get("PLOINTS_CELERY_QUEUE")
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise ConfigError(f"PLOINTS_CELERY_QUEUE must be a non-empty string or None, not {queue!r}")
    lease = parse_seconds("PLOINTS_CELERY_LEASE", get("PLOINTS_CELERY_LEASE"))
    timeout = parse_seconds("PLOINTS_CELERY_PUBLISH_TIMEOUT", get("PLOINTS_CELERY_PUBLISH_TIMEOUT"))
    backoff = parse_seconds("PLOINTS_CELERY_RETRY_BACKOFF", get("PLOINTS_CELERY_RETRY_BACKOFF"))
    backoff_max = parse_seconds(
        "PLOINTS_CELERY_RETRY_BACKOFF_MAX", get("PLOINTS_CELERY_RETRY_BACKOFF_MAX")
    )
    assert lease is not None and timeout is not None
    assert backoff is not None and backoff_max is not None
    if timeout > SENDER_TIMEOUT / 2:
        raise ConfigError(
            f"PLOINTS_CELERY_PUBLISH_TIMEOUT must be at most {SENDER_TIMEOUT / 2:g} s: connecting"
            f" and publishing may each take that long, and the sender gives up after {SENDER_TIMEOUT:g} s"
        )
    retries = get("PLOINTS_CELERY_MAX_RETRIES")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError(
            f"PLOINTS_CELERY_MAX_RETRIES must be an integer of 0 or more, not {retries!r}"
        )
    settings = CelerySettings(
        app=get("PLOINTS_CELERY_APP"),
        queue=queue,
        lease=lease,
        publish_timeout=timeout,
        max_retries=retries,
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
    )
    longest_wait = settings.retry_delay(max(retries - 1, 0))
    if lease <= longest_wait:
        raise ConfigError(
            f"PLOINTS_CELERY_LEASE must exceed the longest wait between retries ({longest_wait:g} s,"
            " from PLOINTS_CELERY_RETRY_BACKOFF and PLOINTS_CELERY_RETRY_BACKOFF_MAX), or a"
            " duplicate delivery is processed while a retry waits"
        )
    return settings


def _namespace(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"PLOINTS_DEDUPE_NAMESPACE must be a string or None, not {redact(value)}")
    return value


def _max_event_age(value: object, retention: float) -> float | None:
    key = "PLOINTS_MAX_EVENT_AGE"
    if value is False:
        return None
    if value is None:
        # A body older than the retention may carry an id the store has
        # forgotten: replayed, it would run again.
        return retention
    max_age = parse_seconds(key, value)
    assert max_age is not None
    if max_age <= SENDER_RETRY_SPAN:
        raise ConfigError(
            f"{key} must exceed the sender's retry span of {SENDER_RETRY_SPAN} s,"
            " or its last retries are rejected"
        )
    if max_age > retention:
        warnings.warn(
            f"{key} is longer than PLOINTS_DEDUPE_RETENTION: a signed body captured once can be"
            " replayed and run again after its id is forgotten",
            PlointsWarning,
            stacklevel=5,
        )
    return max_age


def load_settings(config: t.Mapping[str, t.Any], overrides: t.Mapping[str, t.Any]) -> Settings:
    """Check and convert the settings of one instance.

    :param config: the app's config, with every key of :data:`DEFAULTS` set.
    :param overrides: the keyword arguments given to the extension.
    :raises ConfigError: a value is missing or wrong.
    """

    values = {
        key: overrides[argument] if argument in overrides else config[key]
        for key, (argument, _) in DEFAULTS.items()
    }
    get = values.__getitem__

    url = get("PLOINTS_WEBHOOK_URL")
    if not isinstance(url, str) or not url.startswith("/"):
        raise ConfigError(f"PLOINTS_WEBHOOK_URL must be a path starting with '/', not {url!r}")
    retention = parse_seconds("PLOINTS_DEDUPE_RETENTION", get("PLOINTS_DEDUPE_RETENTION"))
    assert retention is not None
    if retention <= SENDER_RETRY_SPAN:
        raise ConfigError(
            f"PLOINTS_DEDUPE_RETENTION must exceed the sender's retry span of {SENDER_RETRY_SPAN} s "
            "(about 14.6 h), or its last retries are processed twice"
        )
    if retention < 24 * 3600:
        warnings.warn(
            "PLOINTS_DEDUPE_RETENTION is under 24 hours; a delivery resent by hand the next day"
            " will be processed again",
            PlointsWarning,
            stacklevel=4,
        )
    lease = parse_seconds("PLOINTS_CLAIM_LEASE", get("PLOINTS_CLAIM_LEASE"))
    assert lease is not None
    if lease < SENDER_TIMEOUT:
        raise ConfigError(
            f"PLOINTS_CLAIM_LEASE must be at least the sender's {SENDER_TIMEOUT:g} s timeout: a"
            " claim that lapses while the sender still waits lets a retry run the event twice"
        )
    max_bytes = get("PLOINTS_WEBHOOK_MAX_BYTES")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ConfigError(
            f"PLOINTS_WEBHOOK_MAX_BYTES must be a positive integer, not {max_bytes!r}"
        )
    max_age = _max_event_age(get("PLOINTS_MAX_EVENT_AGE"), retention)
    share = get("PLOINTS_SLOW_HANDLER_SHARE")
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
        raise ConfigError(f"PLOINTS_SLOW_HANDLER_SHARE must be a number in (0, 1], not {share!r}")
    max_entries = get("PLOINTS_MEMORY_STORE_MAX_ENTRIES")
    if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
        raise ConfigError(
            f"PLOINTS_MEMORY_STORE_MAX_ENTRIES must be a positive integer, not {max_entries!r}"
        )
    for key in ("PLOINTS_REDIS_PREFIX", "PLOINTS_SQL_TABLE"):
        if not isinstance(get(key), str) or not get(key):
            raise ConfigError(f"{key} must be a non-empty string, not {redact(get(key))}")
    sql_timeout = parse_seconds("PLOINTS_SQL_TIMEOUT", get("PLOINTS_SQL_TIMEOUT"))
    assert sql_timeout is not None
    if sql_timeout > SENDER_TIMEOUT / 4:
        raise ConfigError(
            f"PLOINTS_SQL_TIMEOUT must be at most {SENDER_TIMEOUT / 4:g} s: a call may wait that"
            " long for a connection, to connect and for its statement, and the sender gives up"
            f" after {SENDER_TIMEOUT:g} s"
        )
    if len(get("PLOINTS_SQL_TABLE")) > MAX_TABLE_NAME:
        raise ConfigError(
            f"PLOINTS_SQL_TABLE must be at most {MAX_TABLE_NAME} characters, so that its index"
            " names fit PostgreSQL's and MySQL's limit of 63"
        )
    trace_context = get("PLOINTS_TRACE_CONTEXT")
    if not isinstance(trace_context, str) or trace_context not in _TRACE_CONTEXTS:
        raise ConfigError(
            f"PLOINTS_TRACE_CONTEXT must be 'fresh' or 'join', not {redact(trace_context)}"
        )
    lookup = check_lookup(url, get("PLOINTS_WEBHOOK_SECRET"))
    return Settings(
        values=MappingProxyType(values),
        secrets=() if lookup is not None else _secrets(get("PLOINTS_WEBHOOK_SECRET")),
        url=url,
        store=get("PLOINTS_DEDUPE_STORE"),
        namespace=_namespace(get("PLOINTS_DEDUPE_NAMESPACE")),
        retention=retention,
        lease=lease,
        max_bytes=max_bytes,
        require_https=bool(get("PLOINTS_REQUIRE_HTTPS")),
        max_event_age=max_age,
        slow_handler_seconds=share * SENDER_TIMEOUT,
        dispatch=get("PLOINTS_DISPATCH"),
        celery=_celery_settings(get),
        accounts=None if lookup is None else Accounts(lookup),
    )
