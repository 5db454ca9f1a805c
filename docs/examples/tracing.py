"""Traces of every delivery: a span per delivery and per handler, each
delivery a trace of its own linked to the request's span, with the app's own
spans inside its handlers."""

from __future__ import annotations

import os

from flask import Flask
from opentelemetry import trace

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_SECRET"] = os.environ.get("PLOINTS_WEBHOOK_SECRET", "whsec_dev")
# Spans go to the global tracer provider: the one your app sets with
# trace.set_tracer_provider(), or opentelemetry-instrument sets for it.
app.config["PLOINTS_OPENTELEMETRY"] = True
webhooks = PlointsWebhooks(app)
tracer = trace.get_tracer(__name__)
balances: dict[str, int] = {}


@webhooks.on("points.earned")
def award(event: Event) -> None:
    # A child of the handler's span, which is a child of ploints.deliver.
    with tracer.start_as_current_span("update balance") as span:
        span.set_attribute("app.customer", event.data["customerEmail"])
        balances[event.data["customerEmail"]] = event.data["newBalance"]
