import os

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

engine = sa.create_engine(os.environ["DATABASE_URL"])
Session = scoped_session(sessionmaker(engine))
metadata = sa.MetaData()
ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("amount", sa.Integer, nullable=False),
)

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = os.environ["PLOINTS_WEBHOOK_SECRET"]
app.config["PLOINTS_DEDUPE_STORE"] = Session
webhooks = PlointsWebhooks(app)


@app.teardown_appcontext
def remove_session(exc: BaseException | None) -> None:
    Session.remove()  # the app's scoped_session: the app ends it


@webhooks.on("points.earned")
def book(event: Event) -> None:
    Session.execute(ledger.insert().values(email=event.data["customerEmail"], amount=5))
