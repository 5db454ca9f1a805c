"""Registering handlers: instance decorators, on_any, module-level on(),
raw blinker receivers, async handlers, order and failure semantics.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
from blinker import Signal
from flask import Flask

from flask_ploints import EVENT_TYPES
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import on
from flask_ploints import signals
from flask_ploints.testing import PlointsClient

from .support import build_app


def test_on_takes_several_types(webhooks: PlointsWebhooks, ploints_client: PlointsClient) -> None:
    seen: list[str] = []

    @webhooks.on("points.earned", "points.redeemed")
    def points(event: Event) -> None:
        seen.append(event.type)

    ploints_client.send("points.earned")
    ploints_client.send("points.redeemed")
    ploints_client.send("badge.issued")
    assert seen == ["points.earned", "points.redeemed"]


def test_decorators_return_the_function(webhooks: PlointsWebhooks) -> None:
    def handler(event: Event) -> None: ...

    assert webhooks.on("points.earned")(handler) is handler
    assert webhooks.on_any(handler) is handler


@pytest.mark.parametrize("types", [(), ("points.earn",), ("points.earned", "Points.Earned")])
def test_on_refuses_unknown_types(webhooks: PlointsWebhooks, types: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="event type"):
        webhooks.on(*types)


def test_order_is_type_handlers_then_signal_then_on_any(
    webhooks: PlointsWebhooks, ploints_client: PlointsClient, restore_signals: None
) -> None:
    order: list[str] = []
    webhooks.on_any(lambda event: order.append("any"))
    webhooks.on("points.earned")(lambda event: order.append("first"))
    webhooks.on("points.earned")(lambda event: order.append("second"))
    on("points.earned")(lambda event: order.append("module"))
    ploints_client.send("points.earned")
    assert order == ["first", "second", "module", "any"]


def test_handler_defined_in_a_factory_is_not_garbage_collected(
    webhooks: PlointsWebhooks, ploints_client: PlointsClient, restore_signals: None
) -> None:
    seen: list[str] = []

    def register() -> None:
        @on("customer.created")
        def welcome(event: Event) -> None:
            seen.append(f"module:{event.id}")

        @webhooks.on("customer.created")
        def greet(event: Event) -> None:
            seen.append(f"instance:{event.id}")

    register()
    gc.collect()
    ploints_client.send("customer.created", id="evt_1")
    assert seen == ["instance:evt_1", "module:evt_1"]


def test_module_level_on_serves_every_app(restore_signals: None) -> None:
    seen: list[tuple[str, str]] = []

    @on("badge.issued")
    def record(event: Event) -> None:
        seen.append(("badge", event.id))

    first, _ = build_app()
    second, _ = build_app()
    PlointsClient(first).send("badge.issued", id="evt_a")
    PlointsClient(second).send("badge.issued", id="evt_b")
    assert seen == [("badge", "evt_a"), ("badge", "evt_b")]


def test_raw_blinker_receiver_gets_app_event_and_name(
    app: Flask, ploints_client: PlointsClient
) -> None:
    received: list[tuple[object, dict[str, object]]] = []

    def receiver(sender: object, **kwargs: object) -> None:
        received.append((sender, kwargs))

    with signals.points_earned.connected_to(receiver, sender=app):
        ploints_client.send("points.earned", id="evt_1")
    [(sender, kwargs)] = received
    assert sender is app
    assert kwargs["name"] == "ploints"
    event = kwargs["event"]
    assert isinstance(event, Event)
    assert event.id == "evt_1"


def test_signal_for_maps_each_type_to_its_signal() -> None:
    assert signals.signal_for("points.earned") is signals.points_earned
    assert signals.signal_for("campaign.conversion") is signals.campaign_conversion
    assert signals.signal_for("points.expired") is None
    assert all(isinstance(signals.signal_for(name), Signal) for name in EVENT_TYPES)


def test_async_handlers_run(
    webhooks: PlointsWebhooks, ploints_client: PlointsClient, restore_signals: None
) -> None:
    seen: list[str] = []

    @webhooks.on("reward.redeemed")
    async def instance_handler(event: Event) -> None:
        await asyncio.sleep(0)
        seen.append("instance")

    @on("reward.redeemed")
    async def module_handler(event: Event) -> None:
        await asyncio.sleep(0)
        seen.append("module")

    assert ploints_client.send("reward.redeemed").status_code == 200
    assert seen == ["instance", "module"]


def test_a_failing_handler_stops_the_rest_and_the_retry_runs_all_again(
    webhooks: PlointsWebhooks, ploints_client: PlointsClient
) -> None:
    seen: list[str] = []
    fail = [True]

    @webhooks.on("points.earned")
    def first(event: Event) -> None:
        seen.append("first")

    @webhooks.on("points.earned")
    def second(event: Event) -> None:
        seen.append("second")
        if fail[0]:
            raise ValueError("boom")

    @webhooks.on("points.earned")
    def third(event: Event) -> None:
        seen.append("third")

    assert ploints_client.send("points.earned", id="evt_1").status_code == 500
    fail[0] = False
    assert ploints_client.send("points.earned", id="evt_1").status_code == 200
    assert seen == ["first", "second", "first", "second", "third"]


def test_slow_handlers_log_a_warning(
    webhooks: PlointsWebhooks, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = build_app({"PLOINTS_SLOW_HANDLER_SHARE": 0.01}, webhooks)

    @webhooks.on("points.earned")
    def slow(event: Event) -> None:
        time.sleep(0.15)

    with caplog.at_level(logging.WARNING, logger="flask_ploints"):
        PlointsClient(app).send("points.earned", id="evt_1")
    [record] = caplog.records
    assert record.getMessage().startswith("event 'evt_1' ('points.earned') took 0.")
    assert "Ploints gives up after 10 s" in record.getMessage()
    assert "PLOINTS_DISPATCH" in record.getMessage()


def test_two_instances_keep_their_handlers_apart() -> None:
    app = Flask("two_accounts")
    app.testing = True
    first = PlointsWebhooks(app, secret="whsec_a")
    second = PlointsWebhooks(app, url="/hooks/b", secret="whsec_b", name="b")
    seen: list[str] = []
    first.on("points.earned")(lambda event: seen.append(f"a:{event.id}"))
    second.on("points.earned")(lambda event: seen.append(f"b:{event.id}"))
    assert PlointsClient(app).send("points.earned", id="evt_1").status_code == 200
    assert PlointsClient(app, "b").send("points.earned", id="evt_1").status_code == 200
    wrong_secret = PlointsClient(app, "b")
    wrong_secret.secret = "whsec_a"
    assert wrong_secret.send("points.earned", id="evt_2").status_code == 401
    assert seen == ["a:evt_1", "b:evt_1"]
    assert set(app.extensions["ploints"]) == {"ploints", "b"}
    assert app.url_map.bind("localhost").match("/hooks/b", method="POST") == ("b.receive", {})
