"""Setting the delivery log up on an app from its ``PLOINTS_DELIVERY_LOG_*``
keys.

.. versionadded:: 0.2
"""

from __future__ import annotations

import inspect
import typing as t

from flask import Flask
from sqlalchemy.engine import Engine

from .._config import DELIVERY_LOG_DEFAULTS
from .._config import ConfigError
from .._config import parse_seconds
from ._page import blueprint
from ._state import EXTENSION_KEY
from ._state import DeliveryLogPage
from ._storage import DeliveryLog

__all__ = ["init_delivery_log"]


def init_delivery_log(app: Flask) -> DeliveryLogPage | None:
    """Set up the delivery log on ``app`` if ``PLOINTS_DELIVERY_LOG`` is set.
    :meth:`~flask_ploints.PlointsWebhooks.init_app` imports this package and
    calls it only then, and only the first call on an app does anything, so
    one log and one page serve every instance.

    :return: the page's state, or ``None`` when the log is off.
    :raises ConfigError: a setting is missing or wrong (the access check,
        ``SECRET_KEY``); the message names the key.
    """
    state: DeliveryLogPage | None = app.extensions.get(EXTENSION_KEY)
    if state is not None:
        return state
    for key, default in DELIVERY_LOG_DEFAULTS.items():
        app.config.setdefault(key, default)
    value = app.config["PLOINTS_DELIVERY_LOG"]
    if value is None or value is False:
        return None
    access = app.config["PLOINTS_DELIVERY_LOG_ACCESS"]
    if access is None:
        raise ConfigError(
            "PLOINTS_DELIVERY_LOG_ACCESS is not set: the delivery log shows payloads and re-runs"
            " events, so give it a function that returns True only for users allowed to see it"
        )
    scoped = _takes_account(access)
    if not app.secret_key:
        raise ConfigError(
            "SECRET_KEY is not set: the delivery log keeps its CSRF token in the signed session"
        )
    url = app.config["PLOINTS_DELIVERY_LOG_URL"]
    if not isinstance(url, str) or not url.startswith("/") or url == "/":
        raise ConfigError(
            f"PLOINTS_DELIVERY_LOG_URL must be a path starting with '/' (not '/' itself), not {url!r}"
        )
    retention = parse_seconds(
        "PLOINTS_DELIVERY_LOG_RETENTION",
        app.config["PLOINTS_DELIVERY_LOG_RETENTION"],
        allow_none=True,
    )
    timeout = parse_seconds(
        "PLOINTS_DELIVERY_LOG_TIMEOUT", app.config["PLOINTS_DELIVERY_LOG_TIMEOUT"]
    )
    assert timeout is not None  # parse_seconds gives None only when allowed
    log = _make_log(value, retention, timeout)
    log.connect(app)
    state = DeliveryLogPage(log=log, access=access, url=url.rstrip("/"), scoped=scoped)
    app.extensions[EXTENSION_KEY] = state
    app.register_blueprint(blueprint, url_prefix=state.url)
    return state


def _takes_account(access: object) -> bool:
    """Whether the access check takes the account it is asked about, read
    once, here, from its signature: one positional parameter (``access(account)``)
    or none (``access()``, all or nothing).

    :raises ConfigError: it is not callable, or needs more than one argument.
    """
    message = (
        "PLOINTS_DELIVERY_LOG_ACCESS must be a function taking no arguments, or one (the"
        f" account it is asked about, None for every account), not {access!r}"
    )
    if not callable(access):
        raise ConfigError(message)
    try:
        parameters = inspect.signature(access).parameters.values()
    except (TypeError, ValueError):
        # No signature to read (some builtins): called with no argument.
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(required) > 1 or any(p.kind not in positional for p in required):
        raise ConfigError(message)
    return any(p.kind in positional or p.kind is p.VAR_POSITIONAL for p in parameters)


def _is_flask_sqlalchemy(value: object) -> bool:
    return type(value).__module__.startswith("flask_sqlalchemy") and hasattr(type(value), "engine")


def _engine_of(db: t.Any) -> t.Callable[[], Engine]:
    # Flask-SQLAlchemy knows the app's engine only in an app context, and
    # its init_app may come after this one: the log asks on first use.
    def engine() -> Engine:
        return t.cast(Engine, db.engine)

    return engine


def _make_log(value: object, retention: float | None, timeout: float) -> DeliveryLog:
    if isinstance(value, DeliveryLog):
        return value
    if isinstance(value, Engine):
        return DeliveryLog(value, retention=retention, timeout=timeout)
    if _is_flask_sqlalchemy(value):
        return DeliveryLog(_engine_of(value), retention=retention, timeout=timeout)
    if isinstance(value, str) and "://" in value:
        try:
            return DeliveryLog.from_url(value, retention=retention, timeout=timeout)
        except Exception as exc:
            # SQLAlchemy's message for a bad URL or a missing driver; it
            # holds no password (make_url masks it).
            raise ConfigError(f"PLOINTS_DELIVERY_LOG: {exc}") from None
    raise ConfigError(
        "PLOINTS_DELIVERY_LOG must be a database URL, a SQLAlchemy Engine, a Flask-SQLAlchemy"
        f" extension (db), a DeliveryLog or None, not {type(value).__name__}"
    )
