import os

from flask import Flask

from flask_ploints import PlointsWebhooks

webhooks = PlointsWebhooks()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["PLOINTS_WEBHOOK_SECRET"] = os.environ["PLOINTS_WEBHOOK_SECRET"].split(",")
    # "redis://redis.internal:6379/0" or "postgresql://app@db.internal/app"
    app.config["PLOINTS_DEDUPE_STORE"] = os.environ["PLOINTS_DEDUPE_STORE"]
    webhooks.init_app(app)
    return app
