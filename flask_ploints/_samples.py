"""Example events of every type, for tests, the CLI and the example app.

The sender documents the data of ``points.earned`` only; the data given here
for the other six types is made up in its style, an example to test with and
not the sender's format.
"""

from __future__ import annotations

import typing as t
import uuid
from datetime import UTC
from datetime import datetime

__all__ = ["SAMPLE_DATA", "build_event"]

#: Example ``data`` for each documented event type. ``points.earned`` is the
#: sender's documented example; the sender documents no field of the other
#: types, so their data here is invented in the same style, not taken from
#: the sender.
SAMPLE_DATA: dict[str, dict[str, t.Any]] = {
    "points.earned": {
        "customerEmail": "jane@example.com",
        "amount": 50,
        "description": "Purchase #1234",
        "newBalance": 350,
    },
    "points.redeemed": {
        "customerEmail": "jane@example.com",
        "amount": 20,
        "description": "Redeemed at checkout",
        "newBalance": 330,
    },
    "customer.created": {"customerEmail": "sam@example.com", "name": "Sam Lee"},
    "customer.tier_changed": {
        "customerEmail": "jane@example.com",
        "previousTier": "Silver",
        "newTier": "Gold",
    },
    "badge.issued": {"customerEmail": "jane@example.com", "badge": "Early Bird"},
    "reward.redeemed": {
        "customerEmail": "jane@example.com",
        "reward": "Free coffee",
        "cost": 200,
    },
    "campaign.conversion": {
        "customerEmail": "ana@example.com",
        "campaign": "spring-referral",
        "kind": "referral",
    },
}


def build_event(
    type: str,
    data: t.Mapping[str, t.Any] | None = None,
    *,
    id: str | None = None,
    timestamp: datetime | str | None = None,
) -> dict[str, t.Any]:
    """Build an event body as Ploints sends it.

    :param type: the event type; any string, so unknown types can be tested.
    :param data: the payload; default, the type's example in
        :data:`SAMPLE_DATA` (invented for every type but ``points.earned``),
        or ``{}`` for an unknown type.
    :param id: the event id; default, a fresh random ``evt_...`` id.
    :param timestamp: a datetime or ISO 8601 string; default, now in UTC.
    """
    if timestamp is None:
        timestamp = datetime.now(UTC)
    if isinstance(timestamp, datetime):
        timestamp = timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "id": id if id is not None else f"evt_{uuid.uuid4().hex[:12]}",
        "type": type,
        "timestamp": timestamp,
        "data": dict(SAMPLE_DATA.get(type, {}) if data is None else data),
    }
