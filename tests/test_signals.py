"""Lifecycle signals: sent with the real app, the instance name and the
documented arguments; an observer's exception never changes the answer.
"""

from __future__ import annotations

import typing as t

import pytest
from blinker import Signal
from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import signals
from flask_ploints.testing import PlointsClient

from .support import build_app


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[object, dict[str, t.Any]]] = []

    def __call__(self, sender: object, **kwargs: t.Any) -> None:
        self.calls.append((sender, kwargs))


def _record(signal: Signal, app: Flask) -> tuple[Recorder, t.ContextManager[t.Any]]:
    recorder = Recorder()
    return recorder, signal.connected_to(recorder, sender=app)


def test_event_received_then_duplicate_skipped(app: Flask, ploints_client: PlointsClient) -> None:
    received, received_ctx = _record(signals.event_received, app)
    skipped, skipped_ctx = _record(signals.duplicate_skipped, app)
    with received_ctx, skipped_ctx:
        ploints_client.send("points.earned", id="evt_1")
        ploints_client.send("points.earned", id="evt_1")
    assert [(sender, kwargs["event"].id, kwargs["name"]) for sender, kwargs in received.calls] == [
        (app, "evt_1", "ploints"),
        (app, "evt_1", "ploints"),
    ]
    assert [(sender, kwargs["event"].id) for sender, kwargs in skipped.calls] == [(app, "evt_1")]


def test_signature_rejected_carries_a_reason_not_the_body(
    app: Flask, ploints_client: PlointsClient
) -> None:
    rejected, ctx = _record(signals.signature_rejected, app)
    with ctx:
        ploints_client.post(b'{"forged": true}', signature="0" * 64)
    assert rejected.calls == [(app, {"name": "ploints", "reason": "invalid signature"})]


def test_payload_rejected_carries_the_reason(app: Flask, ploints_client: PlointsClient) -> None:
    rejected, ctx = _record(signals.payload_rejected, app)
    with ctx:
        ploints_client.post(b"[]")
    assert rejected.calls == [(app, {"name": "ploints", "reason": "body is not a JSON object"})]


def test_handler_failed_carries_event_and_exception(
    webhooks: PlointsWebhooks, app: Flask, ploints_client: PlointsClient
) -> None:
    error = KeyError("customer")

    @webhooks.on("points.earned")
    def broken(event: Event) -> None:
        raise error

    failed, ctx = _record(signals.handler_failed, app)
    with ctx:
        ploints_client.send("points.earned", id="evt_1")
    [(sender, kwargs)] = failed.calls
    assert sender is app
    assert kwargs["event"].id == "evt_1"
    assert kwargs["exception"] is error


def test_a_broken_observer_does_not_change_the_answer(
    app: Flask, ploints_client: PlointsClient, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: object, **kwargs: object) -> None:
        raise RuntimeError("metrics backend down")

    with signals.event_received.connected_to(broken, sender=app):
        response = ploints_client.send("points.earned", id="evt_1")
    assert response.status_code == 200
    assert "a receiver of ploints.event-received raised" in caplog.text


def test_signals_of_another_app_are_not_received(make_two_apps: tuple[Flask, Flask]) -> None:
    first, second = make_two_apps
    received, ctx = _record(signals.event_received, first)
    with ctx:
        PlointsClient(second).send("points.earned", id="evt_1")
    assert received.calls == []


@pytest.fixture
def make_two_apps() -> tuple[Flask, Flask]:
    return build_app()[0], build_app()[0]
