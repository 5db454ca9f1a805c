from flask import Flask

from flask_ploints import PlointsWebhooks

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_example"
webhooks = PlointsWebhooks(app)
tiers: dict[str, str] = {}


@webhooks.on(
    "customer.tier_changed",
    latest_by=lambda event: event.data["customerEmail"],
    name="tier",
)
def tier(event):
    # State: the newest event wins, whatever order they arrive in.
    tiers[event.data["customerEmail"]] = event.data["newTier"]
