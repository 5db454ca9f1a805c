import os

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import sessionmaker

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import current_session

engine = sa.create_engine(os.environ["DATABASE_URL"])
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
app.config["PLOINTS_DEDUPE_STORE"] = sessionmaker(engine)
webhooks = PlointsWebhooks(app)


@webhooks.on("points.earned")
async def book(event: Event) -> None:
    # The session flask-ploints opened for this event, also in async handlers.
    session = current_session()
    session.execute(ledger.insert().values(email=event.data["customerEmail"], amount=5))
