from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

webhooks = PlointsWebhooks()
welcomed: list[str] = []


@webhooks.on("customer.created")
def welcome(event: Event) -> None:
    welcomed.append(event.data["customerEmail"])


def create_app(config: dict[str, object] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env()  # FLASK_PLOINTS_WEBHOOK_SECRET=whsec_...
    app.config.update(config or {})
    webhooks.init_app(app)
    return app
