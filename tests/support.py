"""Shared helpers for the test suite; fixtures live in ``conftest.py``."""

from __future__ import annotations

import os
import socket
import typing as t

import pytest
from flask import Flask

from flask_ploints import PlointsWebhooks

SECRET = "whsec_test_current"
OLD_SECRET = "whsec_test_previous"

REDIS_URL = os.environ.get("PLOINTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "PLOINTS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("PLOINTS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
MARIADB_URL = os.environ.get("PLOINTS_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def require_service(name: str, host: str, port: int) -> None:
    """Skip the test when a service is not listening, or fail instead when
    ``PLOINTS_REQUIRE_SERVICES=1`` (as in CI), so nothing passes by skipping.
    """
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        missing(f"{name} is not reachable on {host}:{port} ({exc})")


def missing(reason: str) -> t.NoReturn:
    """Skip the test for ``reason``, something it needs that this machine
    lacks; or fail when ``PLOINTS_REQUIRE_SERVICES=1`` (as in CI).
    """
    if os.environ.get("PLOINTS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; PLOINTS_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(reason)


def build_app(
    config: dict[str, t.Any] | None = None, webhooks: PlointsWebhooks | None = None
) -> tuple[Flask, PlointsWebhooks]:
    """A fresh testing app with ``webhooks`` (default: a new instance)
    registered on it.
    """
    app = Flask("ploints_test")
    app.testing = True
    app.config["PLOINTS_WEBHOOK_SECRET"] = SECRET
    app.config.update(config or {})
    webhooks = webhooks if webhooks is not None else PlointsWebhooks()
    webhooks.init_app(app)
    return app, webhooks
