import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

db = SQLAlchemy()
webhooks = PlointsWebhooks()
ledger = db.Table(
    "ledger",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("amount", sa.Integer, nullable=False),
)


@webhooks.on("points.earned", "points.redeemed")
def book(event: Event) -> None:
    amount = event.data["amount"] if event.type == "points.earned" else -event.data["amount"]
    db.session.execute(ledger.insert().values(email=event.data["customerEmail"], amount=amount))


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env()  # FLASK_SQLALCHEMY_DATABASE_URI, FLASK_PLOINTS_...
    app.config.update(config or {})
    app.config["PLOINTS_DEDUPE_STORE"] = db
    db.init_app(app)
    webhooks.init_app(app)  # after db.init_app(app)
    return app
