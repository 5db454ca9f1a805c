"""Handlers for all seven event types, in every style flask-ploints offers.

They write through ``db.session`` and never commit: flask-ploints commits
their writes together with the event's dedupe record, or rolls them back
when a handler raises. The welcome email is not a database write, so it is
sent with :func:`flask_ploints.after_commit`, once the event is committed.
"""

from __future__ import annotations

import logging
import typing as t

from flask import current_app

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import after_commit
from flask_ploints import on
from flask_ploints import signals

from .loyalty import db
from .loyalty import record

logger = logging.getLogger("example_app")


def send_welcome_email(email: str, name: str) -> None:
    """Stands for a real email: an effect no transaction can take back."""
    logger.info("welcome email sent to %s (%s)", email, name)


# Module level: runs for every app and every PlointsWebhooks instance in the
# process, so it checks that this app is the back office.
@on("customer.created")
def welcome(event: Event) -> None:
    if current_app.extensions.get("sqlalchemy") is not db:
        return
    email, name = event.data["customerEmail"], event.data.get("name", "")
    customer = record(email, "joined", name)
    customer.name = name
    # Sent once the customer is committed; never for a rolled-back event.
    after_commit(send_welcome_email, email, name)


# Raw blinker, at module level so blinker's weak reference stays alive.
@signals.duplicate_skipped.connect
def note_duplicate(sender: object, **extra: t.Any) -> None:
    logger.info("duplicate of %s skipped", extra["event"].id)


def register(webhooks: PlointsWebhooks) -> None:
    """Connect the instance handlers of the example app."""

    @webhooks.on("points.earned", "points.redeemed")
    def points(event: Event) -> None:
        amount = event.data["amount"] if event.type == "points.earned" else -event.data["amount"]
        detail = f"{amount:+d} ({event.data.get('description', '')})"
        record(event.data["customerEmail"], event.type, detail).balance += amount

    # A balance changes by each event's amount, once (the db store), in any
    # order. A tier is state: an older change delivered after a newer one
    # (a retry, a resend) must not move the customer back, so the handler
    # applies the events of each customer in timestamp order.
    @webhooks.on(
        "customer.tier_changed", latest_by=lambda event: event.data["customerEmail"], name="tier"
    )
    def tier(event: Event) -> None:
        new_tier = event.data["newTier"]
        record(event.data["customerEmail"], "tier", new_tier).tier = new_tier

    # async handlers run through app.ensure_sync, as Flask runs async views.
    @webhooks.on("badge.issued")
    async def badge(event: Event) -> None:
        record(event.data["customerEmail"], "badge", event.data["badge"])

    @webhooks.on("reward.redeemed", "campaign.conversion")
    def activity(event: Event) -> None:
        detail = event.data.get("reward") or event.data.get("campaign", "")
        record(event.data["customerEmail"], event.type, str(detail))

    @webhooks.on_any
    def audit(event: Event) -> None:
        logger.info("audit: %s %s", event.type, event.id)
