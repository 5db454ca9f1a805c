"""flask-ploints' log records as JSON lines, with python-json-logger: each
record about an event carries its facts as fields."""

from __future__ import annotations

import logging
import os
import typing as t

from flask import Flask
from pythonjsonlogger.json import JsonFormatter

from flask_ploints import Event
from flask_ploints import PlointsWebhooks


def log_as_json(stream: t.TextIO | None = None) -> logging.Handler:
    """Write the extension's records to ``stream`` (default: stderr) as JSON."""
    handler = logging.StreamHandler(stream)
    # The formatter writes each extra field of a record as a key of its own:
    # ploints_event_id, ploints_event_type, ploints_account, ploints_outcome
    # and ploints_duration.
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("flask_ploints")
    logger.addHandler(handler)
    # INFO includes a record per processed or skipped event.
    logger.setLevel(logging.INFO)
    return handler


app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = os.environ.get("PLOINTS_WEBHOOK_SECRET", "whsec_dev")
webhooks = PlointsWebhooks(app)
balances: dict[str, int] = {}


@webhooks.on("points.earned")
def award(event: Event) -> None:
    balances[event.data["customerEmail"]] = event.data["newBalance"]
