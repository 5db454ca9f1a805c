"""Dedupe stores, and how ``PLOINTS_DEDUPE_STORE`` picks one.

The value may be a store instance, ``None`` (dedupe off), ``"memory"``, a
Redis URL (``redis://``, ``rediss://``, ``unix://``), a database URL
(``postgresql://``, ``sqlite:///``, ``mysql://``...), or a dotted import path
(``"myapp.stores:MyStore"``) to a store class or factory that is called with
the app's config.

:class:`~flask_ploints.stores._redis.RedisStore` and
:class:`~flask_ploints.stores._sql.SQLAlchemyStore` are imported on first
access (a module ``__getattr__``), so importing this package never imports
redis or SQLAlchemy; accessing one without its extra installed raises an
:class:`ImportError` that names the extra.
"""

from __future__ import annotations

import typing as t

from werkzeug.utils import ImportStringError
from werkzeug.utils import import_string

from .._config import DEFAULTS
from .._config import redact
from ._base import Claim
from ._base import ClaimStatus
from ._base import DedupeStore
from ._base import EventState
from ._base import HandlerScope
from ._base import InspectableStore
from ._base import StoredEvent
from ._base import TransactionalStore
from ._memory import MemoryStore
from ._memory import NullStore

if t.TYPE_CHECKING:
    from ._redis import RedisStore
    from ._session import SessionStore
    from ._sql import SQLAlchemyStore

__all__ = [
    "Claim",
    "ClaimStatus",
    "DedupeStore",
    "EventState",
    "HandlerScope",
    "InspectableStore",
    "MemoryStore",
    "RedisStore",
    "SQLAlchemyStore",
    "SessionStore",
    "StoredEvent",
    "TransactionalStore",
]

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
_SQL_BACKENDS = frozenset({"postgresql", "postgres", "sqlite", "mysql", "mariadb"})


def __getattr__(name: str) -> t.Any:
    # The production stores import their client library, an optional extra.
    if name == "RedisStore":
        from ._redis import RedisStore

        return RedisStore
    if name == "SQLAlchemyStore":
        from ._sql import SQLAlchemyStore

        return SQLAlchemyStore
    if name == "SessionStore":
        from ._session import SessionStore

        return SessionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _option(config: t.Mapping[str, t.Any], key: str) -> t.Any:
    return config.get(key, DEFAULTS[key][1])


def _session_of(value: object) -> t.Any:
    """The session (or session factory) of a Flask-SQLAlchemy extension, a
    ``scoped_session`` or a ``sessionmaker``; ``None`` for anything else.
    """
    module = type(value).__module__
    if module.startswith("flask_sqlalchemy"):
        return getattr(value, "session", None)
    if module.startswith("sqlalchemy.orm"):
        from sqlalchemy.orm import scoped_session
        from sqlalchemy.orm import sessionmaker

        if isinstance(value, scoped_session | sessionmaker):
            return value
    return None


def store_from_config(value: object, config: t.Mapping[str, t.Any]) -> DedupeStore:
    """Turn a ``PLOINTS_DEDUPE_STORE`` value into a store.

    :param value: the configured value. A Flask-SQLAlchemy extension
        (``db``), a ``scoped_session`` or a ``sessionmaker`` gives a
        :class:`~flask_ploints.stores._session.SessionStore`.
    :param config: the app's config, for store options:
        ``PLOINTS_MEMORY_STORE_MAX_ENTRIES``, ``PLOINTS_REDIS_PREFIX``
        (default ``"ploints:"``) and ``PLOINTS_SQL_TABLE`` (default
        ``"ploints_events"``).
    :raises ValueError: the value names no store; the message names the key.
    """
    if value is None:
        return NullStore()
    if isinstance(value, DedupeStore):
        return value
    session = _session_of(value)
    if session is not None:
        from ._session import SessionStore

        return SessionStore(
            session,
            table_name=_option(config, "PLOINTS_SQL_TABLE"),
            lock_timeout=_option(config, "PLOINTS_SQL_TIMEOUT"),
            statement_timeout=_option(config, "PLOINTS_SQL_TIMEOUT"),
        )
    if not isinstance(value, str):
        raise ValueError(
            "PLOINTS_DEDUPE_STORE must be a store, a Flask-SQLAlchemy extension or session, a"
            f" name, a URL or None, not {type(value).__name__}"
        )
    if value in ("memory", "memory://"):
        return MemoryStore(max_entries=_option(config, "PLOINTS_MEMORY_STORE_MAX_ENTRIES"))
    if value in ("null", "none"):
        return NullStore()
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme in _REDIS_SCHEMES:
            from ._redis import RedisStore

            return RedisStore.from_url(value, prefix=_option(config, "PLOINTS_REDIS_PREFIX"))
        if scheme.split("+", 1)[0] in _SQL_BACKENDS:
            from ._sql import SQLAlchemyStore

            try:
                return SQLAlchemyStore.from_url(
                    value,
                    table_name=_option(config, "PLOINTS_SQL_TABLE"),
                    timeout=_option(config, "PLOINTS_SQL_TIMEOUT"),
                )
            except ImportError:
                raise
            except Exception as exc:
                # An unknown driver or a malformed URL; SQLAlchemy's message
                # names the driver, never the password.
                raise ValueError(
                    f"PLOINTS_DEDUPE_STORE: cannot use {redact(value)}: {type(exc).__name__}: {exc}"
                ) from None
    if "://" not in value and "." in value:
        try:
            factory = import_string(value.replace(":", "."))
        except ImportStringError:
            raise ValueError(f"PLOINTS_DEDUPE_STORE: cannot import {redact(value)}") from None
        store = factory(config)
        if not isinstance(store, DedupeStore):
            raise ValueError(f"PLOINTS_DEDUPE_STORE: {redact(value)} did not return a dedupe store")
        return store
    raise ValueError(f"PLOINTS_DEDUPE_STORE: unknown store {redact(value)}")
