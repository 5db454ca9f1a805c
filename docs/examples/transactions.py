import os

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import after_commit


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Account(db.Model):
    email: Mapped[str] = mapped_column(primary_key=True)
    points: Mapped[int]


app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["PLOINTS_WEBHOOK_SECRET"] = os.environ["PLOINTS_WEBHOOK_SECRET"]
db.init_app(app)
app.config["PLOINTS_DEDUPE_STORE"] = db  # event ids go in the app's database
webhooks = PlointsWebhooks(app)
receipts: list[str] = []


def send_receipt(email: str, amount: int) -> None:
    receipts.append(f"{email} +{amount}")  # stands for an email or an HTTP call


@webhooks.on("points.earned")
def credit(event: Event) -> None:
    email, amount = event.data["customerEmail"], event.data["amount"]
    account = db.session.get(Account, email) or Account(email=email, points=0)
    account.points += amount
    db.session.add(account)  # no commit: flask-ploints commits it with the event id
    after_commit(send_receipt, email, amount)  # runs once the commit succeeded
