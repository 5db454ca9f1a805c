"""The app that ``tests/test_servers.py`` runs under each WSGI server.

Everything comes from environment variables, so one module serves every
server and every test:

``PLOINTS_SERVERS_STORE``
    the ``PLOINTS_DEDUPE_STORE`` URL (``redis://...`` or ``postgresql://...``);
    ``db:`` and a database URL: ``PLOINTS_DEDUPE_STORE = db``, a
    Flask-SQLAlchemy extension on that database.
``PLOINTS_SERVERS_NAMESPACE``
    a name only this test uses: the Redis key prefix of the store is
    ``NAMESPACE:store:``, its SQL table ``NAMESPACE_store``.
``PLOINTS_SERVERS_EFFECTS``
    a Redis URL; the handler appends each event id it processes to the list
    ``NAMESPACE:fx`` there, so effects are counted across processes.
``PLOINTS_SERVERS_BEHIND_PROXY``
    ``1``: ``PLOINTS_REQUIRE_HTTPS`` on and the app wrapped in werkzeug's
    ``ProxyFix(x_proto=1, x_for=1)``, as behind nginx.

The handler holds each event for ``data["hold"]`` seconds (default 0) before
recording it, so that copies of one id overlap and some are answered ``409``.
A second handler, of ``customer.tier_changed`` with ``latest_by`` the
customer's email, holds each event as long, then appends its id to the list
``NAMESPACE:tiers``.

Gunicorn and waitress call :func:`create_app`; uWSGI imports
:data:`application` from :mod:`tests.server_wsgi`; ``python -m
tests.server_app PORT`` runs werkzeug's threaded development server.
"""

from __future__ import annotations

import os
import sys
import time
import typing as t

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

#: The secret the app and the tests sign with.
SECRET = "whsec_servers"


def effects_key(namespace: str) -> str:
    """The Redis list of processed event ids."""
    return f"{namespace}:fx"


def create_app() -> Flask:
    """Build the app from the ``PLOINTS_SERVERS_*`` environment variables."""
    namespace = os.environ["PLOINTS_SERVERS_NAMESPACE"]
    behind_proxy = os.environ.get("PLOINTS_SERVERS_BEHIND_PROXY") == "1"
    store = os.environ["PLOINTS_SERVERS_STORE"]
    app = Flask("ploints_servers")
    app.config.update(
        PLOINTS_WEBHOOK_SECRET=SECRET,
        PLOINTS_DEDUPE_STORE=store,
        PLOINTS_REDIS_PREFIX=f"{namespace}:store:",
        PLOINTS_SQL_TABLE=f"{namespace}_store",
        PLOINTS_REQUIRE_HTTPS=behind_proxy,
    )
    if store.startswith("db:"):
        from flask_sqlalchemy import SQLAlchemy

        db = SQLAlchemy()
        app.config.update(SQLALCHEMY_DATABASE_URI=store[len("db:") :], PLOINTS_DEDUPE_STORE=db)
        db.init_app(app)
    webhooks = PlointsWebhooks(app)
    # Made on first use, in the worker: a connection opened before a fork
    # would be shared by every worker process.
    clients: list[t.Any] = []

    @webhooks.on_any
    def record(event: Event) -> None:
        if not clients:
            import redis

            clients.append(
                redis.Redis.from_url(os.environ["PLOINTS_SERVERS_EFFECTS"], socket_timeout=5)
            )
        hold = event.data.get("hold")
        if hold:
            time.sleep(float(hold))
        clients[0].rpush(effects_key(namespace), event.id)

    def redis_client() -> t.Any:
        if not clients:
            import redis

            clients.append(
                redis.Redis.from_url(os.environ["PLOINTS_SERVERS_EFFECTS"], socket_timeout=5)
            )
        return clients[0]

    @webhooks.on(
        "customer.tier_changed", latest_by=lambda event: event.data["customerEmail"], name="tier"
    )
    def tier(event: Event) -> None:
        time.sleep(float(event.data.get("hold", 0)))
        redis_client().rpush(f"{namespace}:tiers", event.id)

    if behind_proxy:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_for=1)  # type: ignore[method-assign]
    return app


def main() -> None:
    """Serve the app with werkzeug's threaded server on ``argv[1]``."""
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", int(sys.argv[1]), create_app(), threaded=True)


if __name__ == "__main__":
    main()
