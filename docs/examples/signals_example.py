import typing as t

from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import on
from flask_ploints import signals

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_..."
webhooks = PlointsWebhooks(app)
log: list[str] = []


# For every app and every PlointsWebhooks instance in the process.
@on("customer.tier_changed")
def tier(event: Event) -> None:
    log.append(f"tier {event.data['newTier']}")


# Raw blinker, for this app only: the sender is the app itself.
@signals.reward_redeemed.connect_via(app)
def reward(sender: Flask, event: Event, **extra: t.Any) -> None:
    log.append(f"reward {event.data['reward']} via {extra['name']}")


# A lifecycle signal: observers only, their errors never change the answer.
@signals.duplicate_skipped.connect_via(app)
def duplicate(sender: Flask, event: Event, **extra: t.Any) -> None:
    log.append(f"duplicate {event.id}")
