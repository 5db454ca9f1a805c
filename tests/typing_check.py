"""A user's module written against the public API; ``mypy --strict`` checks
it (see ``[tool.mypy]``), so the public API stays typed for users.
"""

from __future__ import annotations

from flask import Flask

from flask_ploints import EVENT_TYPES
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import on
from flask_ploints import signals
from flask_ploints._signature import sign
from flask_ploints._signature import verify
from flask_ploints.payloads import PointsEarned
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import MemoryStore
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_typed"
webhooks = PlointsWebhooks(app, store=MemoryStore(max_entries=10))
partner = PlointsWebhooks(app, name="partner", url="/hooks/partner", secret="whsec_partner")


@webhooks.on("points.earned", "points.redeemed")
def award(event: Event) -> None:
    amount: int = event.data["amount"]
    print(event.id, event.type, event.timestamp.isoformat(), amount, len(event.raw))


@webhooks.on("points.earned", model=PointsEarned)
def typed(event: Event, payload: PointsEarned) -> None:
    total: int = payload.amount + payload.new_balance
    print(event.id, payload.customer_email, total)


@webhooks.on_any
async def audit(event: Event) -> None:
    print(event.type)


@on("customer.created")
def welcome(event: Event) -> None:
    print(event.data.get("customerEmail"))


def on_received(sender: Flask, *, event: Event, name: str) -> None:
    print(sender.name, event.id, name)


signals.event_received.connect(on_received, sender=app)
types: tuple[str, ...] = EVENT_TYPES
body: bytes = b"{}"
valid: bool = verify(body, sign(body, "whsec_typed"), ["whsec_typed", "whsec_old"])
status: int = (
    PlointsClient(app).send("points.earned", build_event("points.earned")["data"]).status_code
)
claimed: bool = MemoryStore().claim("evt_1", 30).status is ClaimStatus.CLAIMED
