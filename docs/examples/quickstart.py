from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_..."  # the secret Ploints showed you
webhooks = PlointsWebhooks(app)  # listens on POST /webhooks/ploints

balances: dict[str, int] = {}


@webhooks.on("points.earned")
def award(event: Event) -> None:
    email = event.data["customerEmail"]
    balances[email] = event.data["newBalance"]


@webhooks.on_any
def audit(event: Event) -> None:
    app.logger.info("%s %s", event.type, event.id)
