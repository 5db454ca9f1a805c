import os

from flask import Flask
from flask import session

from flask_ploints import PlointsWebhooks

webhooks = PlointsWebhooks()


def is_staff() -> bool:
    # Your own check: here, a role your login view keeps in the session.
    return session.get("role") == "staff"


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ["SECRET_KEY"]
    app.config["PLOINTS_WEBHOOK_SECRET"] = os.environ["PLOINTS_WEBHOOK_SECRET"]
    app.config["PLOINTS_DEDUPE_STORE"] = os.environ["DATABASE_URL"]
    # The same database; the log keeps its own table, ploints_deliveries.
    app.config["PLOINTS_DELIVERY_LOG"] = os.environ["DATABASE_URL"]
    app.config["PLOINTS_DELIVERY_LOG_ACCESS"] = is_staff
    webhooks.init_app(app)  # the page is at /ploints/deliveries
    return app
