"""A small loyalty back office that receives Ploints webhooks.

It uses every way flask-ploints offers to register a handler, keeps its data
in SQLite (the embedded default, nothing to install), and stays correct when
Ploints delivers the same event twice: the dedupe store skips a repeat, and
each handler records the event id in the same transaction as its change.
"""

from __future__ import annotations

import logging
import os
import secrets
import typing as t

from flask import Flask
from flask import jsonify
from flask import render_template
from flask import request

from flask_ploints import PlointsWebhooks

from . import handlers
from .loyalty import Loyalty


def _local_only() -> bool:
    # The delivery log shows customers' data: the demo serves it to this
    # machine only. A real app checks its own login here.
    return request.remote_addr in ("127.0.0.1", "::1")


#: The secret the demo signs with; a real app reads it from the environment.
DEMO_SECRET = "whsec_example_demo_secret"


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Build the example app.

    :param config: overrides; by default the database lives in the app's
        instance folder and the secret comes from ``PLOINTS_WEBHOOK_SECRET``
        in the environment, or the demo secret.
    """
    app = Flask(__name__, instance_path=os.path.join(os.path.dirname(__file__), "instance"))
    os.makedirs(app.instance_path, exist_ok=True)
    ploints_db = "sqlite:///" + os.path.join(app.instance_path, "ploints.sqlite3")
    app.config.update(
        DATABASE=os.path.join(app.instance_path, "loyalty.sqlite3"),
        SECRET_KEY=os.environ.get("SECRET_KEY") or secrets.token_hex(16),
        PLOINTS_WEBHOOK_SECRET=os.environ.get("PLOINTS_WEBHOOK_SECRET", DEMO_SECRET),
        # Embedded SQLite: the dedupe store keeps payloads, so failed events
        # can be replayed, and the delivery log page reads the same file.
        PLOINTS_DEDUPE_STORE=ploints_db,
        PLOINTS_DELIVERY_LOG=ploints_db,
        PLOINTS_DELIVERY_LOG_ACCESS=_local_only,
    )
    app.config.update(config or {})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    loyalty = Loyalty(app.config["DATABASE"])
    loyalty.create_schema()
    app.extensions["loyalty"] = loyalty

    webhooks = PlointsWebhooks(app)
    handlers.register(webhooks)

    @app.get("/")
    def index() -> str:
        return render_template("customers.html", customers=loyalty.customers())

    @app.get("/customers")
    def customers() -> t.Any:
        return jsonify(loyalty.customers())

    return app
