"""Handlers for all seven event types, in every style flask-ploints offers."""

from __future__ import annotations

import logging
import typing as t

from flask import current_app

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import on
from flask_ploints import signals

from .loyalty import Loyalty

logger = logging.getLogger("example_app")


def _loyalty() -> Loyalty:
    loyalty: Loyalty = current_app.extensions["loyalty"]
    return loyalty


# Module level: runs for every app and every PlointsWebhooks instance in the
# process, so it checks that this app is the back office.
@on("customer.created")
def welcome(event: Event) -> None:
    if "loyalty" not in current_app.extensions:
        return
    _loyalty().apply(
        event.id,
        event.data["customerEmail"],
        "joined",
        event.data.get("name", ""),
        "UPDATE customers SET name = ? WHERE email = ?",
        (event.data.get("name"),),
    )


# Raw blinker, at module level so blinker's weak reference stays alive.
@signals.duplicate_skipped.connect
def note_duplicate(sender: object, **extra: t.Any) -> None:
    logger.info("duplicate of %s skipped", extra["event"].id)


def register(webhooks: PlointsWebhooks) -> None:
    """Connect the instance handlers of the example app."""

    @webhooks.on("points.earned", "points.redeemed")
    def points(event: Event) -> None:
        amount = event.data["amount"] if event.type == "points.earned" else -event.data["amount"]
        _loyalty().apply(
            event.id,
            event.data["customerEmail"],
            event.type,
            f"{amount:+d} ({event.data.get('description', '')})",
            "UPDATE customers SET balance = balance + ? WHERE email = ?",
            (amount,),
        )

    @webhooks.on("customer.tier_changed")
    def tier(event: Event) -> None:
        _loyalty().apply(
            event.id,
            event.data["customerEmail"],
            "tier",
            event.data["newTier"],
            "UPDATE customers SET tier = ? WHERE email = ?",
            (event.data["newTier"],),
        )

    # async handlers run through app.ensure_sync, as Flask runs async views.
    @webhooks.on("badge.issued")
    async def badge(event: Event) -> None:
        _loyalty().apply(event.id, event.data["customerEmail"], "badge", event.data["badge"])

    @webhooks.on("reward.redeemed", "campaign.conversion")
    def activity(event: Event) -> None:
        detail = event.data.get("reward") or event.data.get("campaign", "")
        _loyalty().apply(event.id, event.data["customerEmail"], event.type, str(detail))

    @webhooks.on_any
    def audit(event: Event) -> None:
        logger.info("audit: %s %s", event.type, event.id)
