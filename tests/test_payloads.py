"""Typed payloads: the documented points.earned model, user models, and a
payload that does not fit counting as a handler failure.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints.payloads import PayloadError
from flask_ploints.payloads import PointsEarned
from flask_ploints.payloads import convert
from flask_ploints.testing import PlointsClient


@dataclasses.dataclass(frozen=True)
class BadgeIssued:
    customer_email: str
    badge: str
    level: int | None = None


def test_points_earned_reads_the_documented_fields() -> None:
    data = {
        "customerEmail": "jane@example.com",
        "amount": 50,
        "description": "Purchase #1234",
        "newBalance": 350,
        "storeId": "s_9",
    }
    assert convert(PointsEarned, data) == PointsEarned(
        customer_email="jane@example.com", amount=50, new_balance=350, description="Purchase #1234"
    )


def test_optional_fields_may_be_absent() -> None:
    data = {"customerEmail": "jane@example.com", "amount": 5, "newBalance": 5}
    assert convert(PointsEarned, data).description == ""


@pytest.mark.parametrize(
    "data, message",
    [
        ({"amount": 5, "newBalance": 5}, "PointsEarned: missing field 'customerEmail'"),
        (
            {"customerEmail": "a", "amount": "5", "newBalance": 5},
            "PointsEarned: field 'amount' is str, not int",
        ),
        (
            {"customerEmail": "a", "amount": True, "newBalance": 5},
            "PointsEarned: field 'amount' is bool, not int",
        ),
        (
            {"customerEmail": None, "amount": 1, "newBalance": 5},
            "PointsEarned: field 'customerEmail' is NoneType, not str",
        ),
    ],
)
def test_data_that_does_not_fit_is_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(PayloadError) as info:
        convert(PointsEarned, data)
    assert str(info.value) == message


def test_snake_case_keys_are_accepted_too() -> None:
    assert (
        convert(BadgeIssued, {"customer_email": "a@b.c", "badge": "Gold", "level": None}).level
        is None
    )


def test_handler_with_a_model_receives_event_and_payload(
    webhooks: PlointsWebhooks, app: Flask
) -> None:
    received: list[tuple[str, BadgeIssued]] = []

    @webhooks.on("badge.issued", model=BadgeIssued)
    def badge(event: Event, payload: BadgeIssued) -> None:
        received.append((event.id, payload))

    response = PlointsClient(app).send(
        "badge.issued", {"customerEmail": "a@b.c", "badge": "Gold", "x": 1}, id="evt_1"
    )
    assert response.status_code == 200
    assert received == [("evt_1", BadgeIssued(customer_email="a@b.c", badge="Gold"))]


def test_async_handler_with_a_model(webhooks: PlointsWebhooks, app: Flask) -> None:
    received: list[PointsEarned] = []

    @webhooks.on("points.earned", model=PointsEarned)
    async def award(event: Event, payload: PointsEarned) -> None:
        await asyncio.sleep(0)
        received.append(payload)

    PlointsClient(app).send("points.earned", id="evt_1")
    assert received == [PointsEarned("jane@example.com", 50, 350, "Purchase #1234")]


def test_a_payload_that_does_not_fit_is_a_handler_failure_and_is_retried(
    webhooks: PlointsWebhooks, app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[BadgeIssued] = []
    webhooks.on("badge.issued", model=BadgeIssued)(lambda event, payload: received.append(payload))
    client = PlointsClient(app)
    failed = client.send("badge.issued", {"customerEmail": "a@b.c"}, id="evt_1")
    assert failed.status_code == 500
    assert "BadgeIssued: missing field 'badge'" in caplog.text
    fixed = client.send("badge.issued", {"customerEmail": "a@b.c", "badge": "Gold"}, id="evt_1")
    assert fixed.status_code == 200
    assert received == [BadgeIssued("a@b.c", "Gold")]


def test_model_must_be_a_dataclass_or_validatable() -> None:
    with pytest.raises(TypeError, match="neither a dataclass nor has model_validate"):
        convert(dict, {})  # type: ignore[type-var]


class Validated:
    def __init__(self, badge: str) -> None:
        self.badge = badge

    @classmethod
    def model_validate(cls, data: dict[str, object]) -> Validated:
        if "badge" not in data:
            raise ValueError("badge is required")
        return cls(str(data["badge"]))


def test_pydantic_style_models_are_validated() -> None:
    assert convert(Validated, {"badge": "Gold"}).badge == "Gold"
    with pytest.raises(PayloadError, match=r"^Validated: badge is required$"):
        convert(Validated, {})
