"""A small loyalty back office that receives Ploints webhooks.

It uses every way flask-ploints offers to register a handler, keeps its data
in SQLite (the embedded default, nothing to install), and stays correct when
Ploints delivers the same event twice: the dedupe store skips a repeat, and
each handler records the event id in the same transaction as its change.
"""

from __future__ import annotations

import logging
import os
import typing as t

from flask import Flask
from flask import jsonify

from flask_ploints import PlointsWebhooks

from . import handlers
from .loyalty import Loyalty

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
    app.config.update(
        DATABASE=os.path.join(app.instance_path, "loyalty.sqlite3"),
        PLOINTS_WEBHOOK_SECRET=os.environ.get("PLOINTS_WEBHOOK_SECRET", DEMO_SECRET),
        # One process serves the demo, so the in-memory store is enough; a
        # deployment with several workers sets a Redis or database URL here.
        PLOINTS_DEDUPE_STORE="memory",
    )
    app.config.update(config or {})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    loyalty = Loyalty(app.config["DATABASE"])
    loyalty.create_schema()
    app.extensions["loyalty"] = loyalty

    webhooks = PlointsWebhooks(app)
    handlers.register(webhooks)

    @app.get("/customers")
    def customers() -> t.Any:
        return jsonify(loyalty.customers())

    return app
