"""Prometheus metrics fed by the lifecycle signals."""

from __future__ import annotations

import pytest
from flask import Flask
from prometheus_client import REGISTRY
from prometheus_client import CollectorRegistry

from flask_ploints import ConfigError
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints.metrics import Metrics
from flask_ploints.metrics import default_metrics
from flask_ploints.testing import PlointsClient

from .support import build_app


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_deliveries_are_counted_by_type_and_outcome(
    registry: CollectorRegistry, webhooks: PlointsWebhooks
) -> None:
    app, _ = build_app({"PLOINTS_METRICS": Metrics(registry)}, webhooks)

    @webhooks.on("badge.issued")
    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    client = PlointsClient(app)
    client.send("points.earned", id="evt_1")
    client.send("points.earned", id="evt_1")
    client.send("badge.issued", id="evt_2")
    client.send("points.vanished", id="evt_3")
    client.post(b"{}", signature="0" * 64)
    client.post(b"[]")

    assert (
        _value(registry, "ploints_deliveries_total", type="points.earned", outcome="processed") == 1
    )
    assert (
        _value(registry, "ploints_deliveries_total", type="points.earned", outcome="duplicate") == 1
    )
    assert _value(registry, "ploints_deliveries_total", type="badge.issued", outcome="failed") == 1
    assert _value(registry, "ploints_deliveries_total", type="other", outcome="processed") == 1
    assert _value(registry, "ploints_deliveries_total", type="unknown", outcome="rejected") == 2
    assert _value(registry, "ploints_signature_failures_total") == 1
    assert _value(registry, "ploints_duplicates_total", type="points.earned") == 1
    assert _value(registry, "ploints_handler_failures_total", type="badge.issued") == 1
    assert _value(registry, "ploints_handler_duration_seconds_count", type="points.earned") == 1
    assert _value(registry, "ploints_handler_duration_seconds_count", type="badge.issued") == 1


def test_two_instances_on_one_app_count_once(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    app = Flask("two")
    app.testing = True
    app.config.update(PLOINTS_WEBHOOK_SECRET="whsec_a", PLOINTS_METRICS=metrics)
    PlointsWebhooks(app)
    PlointsWebhooks(app, name="b", url="/hooks/b")
    PlointsClient(app).send("points.earned")
    assert (
        _value(registry, "ploints_deliveries_total", type="points.earned", outcome="processed") == 1
    )


def test_one_line_enable_uses_the_default_registry() -> None:
    app, _ = build_app({"PLOINTS_METRICS": True})
    other, _ = build_app({"PLOINTS_METRICS": True})
    assert default_metrics() is default_metrics()
    labels = {"type": "customer.created", "outcome": "processed"}
    before = _value(REGISTRY, "ploints_deliveries_total", **labels)
    PlointsClient(app).send("customer.created")
    PlointsClient(other).send("customer.created")
    assert _value(REGISTRY, "ploints_deliveries_total", **labels) == before + 2


def test_other_apps_are_not_counted(registry: CollectorRegistry) -> None:
    build_app({"PLOINTS_METRICS": Metrics(registry)})
    quiet, _ = build_app()
    PlointsClient(quiet).send("points.earned")
    assert (
        _value(registry, "ploints_deliveries_total", type="points.earned", outcome="processed") == 0
    )


def test_a_wrong_value_names_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"^PLOINTS_METRICS must be True, False or a Metrics instance"
    ):
        build_app({"PLOINTS_METRICS": "yes"})
