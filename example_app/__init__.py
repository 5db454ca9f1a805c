"""A small loyalty back office that receives Ploints webhooks.

It uses every way flask-ploints offers to register a handler, keeps its data
in SQLite (the embedded default, nothing to install) through Flask-SQLAlchemy,
and changes its data exactly once per event however often Ploints delivers
it: the dedupe store is the app's own database (``PLOINTS_DEDUPE_STORE =
db``), so each event's id is recorded in the same transaction as the
handlers' writes, by flask-ploints. The handlers neither commit nor keep
event ids themselves.
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
from .loyalty import customers
from .loyalty import db


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
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite:///" + os.path.join(app.instance_path, "loyalty.sqlite3"),
        SECRET_KEY=os.environ.get("SECRET_KEY") or secrets.token_hex(16),
        PLOINTS_WEBHOOK_SECRET=os.environ.get("PLOINTS_WEBHOOK_SECRET", DEMO_SECRET),
        # Event ids are kept in the app's own database, committed with the
        # handlers' writes; the store keeps their payloads for replay.
        PLOINTS_DEDUPE_STORE=db,
        PLOINTS_DELIVERY_LOG_ACCESS=_local_only,
    )
    app.config.update(config or {})
    # The delivery log page reads its own table in the same database.
    app.config.setdefault("PLOINTS_DELIVERY_LOG", app.config["SQLALCHEMY_DATABASE_URI"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    db.init_app(app)
    with app.app_context():
        db.create_all()

    # After db.init_app: the store finds the app's database through db.
    webhooks = PlointsWebhooks(app)
    handlers.register(webhooks)

    @app.get("/")
    def index() -> str:
        return render_template("customers.html", customers=customers())

    @app.get("/customers")
    def customer_list() -> t.Any:
        return jsonify(customers())

    return app
