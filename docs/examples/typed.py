from dataclasses import dataclass

from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints.payloads import PointsEarned

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_..."
webhooks = PlointsWebhooks(app)
badges: dict[str, str] = {}
balances: dict[str, int] = {}


@webhooks.on("points.earned", model=PointsEarned)
def award(event: Event, payload: PointsEarned) -> None:
    balances[payload.customer_email] = payload.new_balance


@dataclass(frozen=True)
class BadgeIssued:
    customer_email: str  # filled from "customerEmail"
    badge: str


@webhooks.on("badge.issued", model=BadgeIssued)
def badge(event: Event, payload: BadgeIssued) -> None:
    badges[payload.customer_email] = payload.badge
