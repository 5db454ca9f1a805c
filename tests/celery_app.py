"""The app that ``tests/test_celery.py`` runs under real Celery workers.

A worker loads it with ``celery -A tests.celery_app:celery worker``; the
test process builds the same app with :func:`create_app`. Everything the
worker needs comes from environment variables, so each test runs its own
workers on its own queue and keys:

``PLOINTS_CELERY_TEST_BROKER``
    the broker URL.
``PLOINTS_CELERY_TEST_REDIS``
    the Redis URL of the dedupe store and of the recorded effects.
``PLOINTS_CELERY_TEST_NAMESPACE``
    a name only this test uses: the queue, and the Redis key prefix.
``PLOINTS_CELERY_TEST_CONFIG``
    more config keys, as a JSON object.
``PLOINTS_CELERY_TEST_CELERY``
    more Celery settings of the worker, as a JSON object (a Redis broker's
    ``broker_transport_options``, say).

The Celery app is set up as Flask's "Background Tasks with Celery" shows
(:func:`tests.celery_flask.celery_init_app`), so the extension finds it in
``app.extensions["celery"]``.

The handler records a start (with its pid) before anything else. When the
event's data holds ``"sleep": seconds`` and this is the first start of the
event, it sleeps that long; when it holds ``"fail": true`` it raises unless
the key ``NAMESPACE:fixed`` exists. Then it records one effect. Each effect
stands for one time the event was processed. The ``handler_failed`` and
``event_processed`` signals are counted too. A second handler, of
``customer.tier_changed`` with ``latest_by`` the customer's email, appends
each event id it applies to the list ``NAMESPACE:tiers``.

When the config turns ``PLOINTS_OPENTELEMETRY`` on, the worker sets a global
tracer provider that writes each finished span to the Redis list
``NAMESPACE:spans``, where the test reads them. When it holds
``"TEST_RECORD_LOGS": true``, the worker writes each ``flask_ploints`` log
record (its message and its ``ploints_*`` fields) to ``NAMESPACE:logs``.
When it holds ``"TEST_DELIVERY_LOG": {"url": ..., "table": ...}``, the app
records its deliveries in that table (the page admits everybody).
"""

from __future__ import annotations

import json
import logging
import os
import time
import typing as t

import redis
from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import signals
from flask_ploints.delivery_log import DeliveryLog

from .celery_flask import celery_init_app
from .celery_flask import celery_settings

#: The secret both the app and the tests sign with.
SECRET = "whsec_celery"


class Recorder:
    """What the handlers of one test did, in Redis under ``namespace``.

    :param url: the Redis to write to.
    :param namespace: the per-test name.
    """

    def __init__(self, url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.namespace = namespace

    def key(self, name: str) -> str:
        """Return the Redis key of one record."""
        return f"{self.namespace}:{name}"

    def count(self, name: str) -> dict[str, int]:
        """Return the counts of one record, by event id."""
        found = self.client.hgetall(self.key(name))
        return {key.decode(): int(value) for key, value in found.items()}

    def add(self, name: str, event_id: str) -> int:
        """Count one more ``name`` for ``event_id``; return the new count."""
        return int(self.client.hincrby(self.key(name), event_id, 1))

    def fix(self) -> None:
        """Make failing handlers succeed from now on."""
        self.client.set(self.key("fixed"), 1)

    def fixed(self) -> bool:
        """Whether :meth:`fix` was called."""
        return bool(self.client.exists(self.key("fixed")))

    def spans(self) -> list[dict[str, t.Any]]:
        """Return the spans the worker exported, in the order they ended."""
        return [json.loads(item) for item in self.client.lrange(self.key("spans"), 0, -1)]

    def logs(self) -> list[dict[str, t.Any]]:
        """Return the worker's ``flask_ploints`` records, in order."""
        return [json.loads(item) for item in self.client.lrange(self.key("logs"), 0, -1)]

    def forget(self) -> None:
        """Delete every key of the namespace (records and the store's)."""
        keys = list(self.client.scan_iter(match=f"{self.namespace}:*", count=500))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        """Close the client."""
        self.client.close()


def create_app(
    broker_url: str, redis_url: str, namespace: str, config: t.Mapping[str, t.Any] | None = None
) -> Flask:
    """Build the app of one test.

    :param broker_url: the broker.
    :param redis_url: the Redis of the store and of the records.
    :param namespace: the queue name and the Redis key prefix.
    :param config: more config keys.
    """
    app = Flask("ploints_celery_test")
    app.testing = True
    app.config.update(
        PLOINTS_WEBHOOK_SECRET=SECRET,
        PLOINTS_DISPATCH="celery",
        PLOINTS_DEDUPE_STORE=redis_url,
        PLOINTS_REDIS_PREFIX=f"{namespace}:store:",
        PLOINTS_CELERY_QUEUE=namespace,
        CELERY=celery_settings(broker_url),
    )
    app.config.update(config or {})
    log = app.config.get("TEST_DELIVERY_LOG")
    if log is not None:
        app.config.update(
            PLOINTS_DELIVERY_LOG=DeliveryLog.from_url(log["url"], table_name=log["table"]),
            PLOINTS_DELIVERY_LOG_ACCESS=lambda: True,
            SECRET_KEY="celery-test",
        )
    celery_init_app(app)
    webhooks = PlointsWebhooks(app)
    recorder = Recorder(redis_url, namespace)

    @webhooks.on_any
    def handle(event: Event) -> None:
        recorder.client.hset(recorder.key("pid"), event.id, os.getpid())
        first = recorder.add("starts", event.id) == 1
        if first and event.data.get("sleep"):
            time.sleep(float(event.data["sleep"]))
        if event.data.get("fail") and not recorder.fixed():
            raise RuntimeError(f"handler broke on purpose on {event.id}")
        recorder.add("effects", event.id)

    @webhooks.on(
        "customer.tier_changed", latest_by=lambda event: event.data["customerEmail"], name="tier"
    )
    def tier(event: Event) -> None:
        recorder.client.rpush(recorder.key("tiers"), event.id)

    def failed(sender: Flask, *, event: Event, **extra: t.Any) -> None:
        recorder.add("handler_failed", event.id)

    def processed(sender: Flask, *, event: Event, **extra: t.Any) -> None:
        recorder.add("event_processed", event.id)

    signals.handler_failed.connect(failed, sender=app, weak=False)
    signals.event_processed.connect(processed, sender=app, weak=False)
    return app


def create_app_from_env() -> Flask:
    """Build the app from the ``PLOINTS_CELERY_TEST_*`` variables."""
    return create_app(
        os.environ["PLOINTS_CELERY_TEST_BROKER"],
        os.environ["PLOINTS_CELERY_TEST_REDIS"],
        os.environ["PLOINTS_CELERY_TEST_NAMESPACE"],
        json.loads(os.environ.get("PLOINTS_CELERY_TEST_CONFIG", "{}")),
    )


def export_spans_to_redis(redis_url: str, namespace: str) -> None:
    """Set the global tracer provider of this process (a worker) to one that
    writes every finished span to the Redis list ``NAMESPACE:spans``.
    """
    # Imported here: only the tracing tests need the SDK in the worker.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    recorder = Recorder(redis_url, namespace)

    class RedisSpanExporter(SpanExporter):  # type: ignore[misc]
        def export(self, spans: t.Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                assert span.context is not None
                record = {
                    "name": span.name,
                    "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "attributes": dict(span.attributes or {}),
                    "status": span.status.status_code.name,
                    "events": [event.name for event in span.events],
                }
                recorder.client.rpush(recorder.key("spans"), json.dumps(record))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedisSpanExporter()))
    trace.set_tracer_provider(provider)


class _RedisLogHandler(logging.Handler):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.INFO)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        fields = {key: value for key, value in vars(record).items() if key.startswith("ploints_")}
        item = json.dumps({"message": record.getMessage(), **fields})
        self.recorder.client.rpush(self.recorder.key("logs"), item)


if "PLOINTS_CELERY_TEST_NAMESPACE" in os.environ:
    _config = json.loads(os.environ.get("PLOINTS_CELERY_TEST_CONFIG", "{}"))
    _redis, _namespace = (
        os.environ["PLOINTS_CELERY_TEST_REDIS"],
        os.environ["PLOINTS_CELERY_TEST_NAMESPACE"],
    )
    if _config.get("PLOINTS_OPENTELEMETRY"):
        export_spans_to_redis(_redis, _namespace)
    if _config.get("TEST_RECORD_LOGS"):
        logging.getLogger("flask_ploints").addHandler(
            _RedisLogHandler(Recorder(_redis, _namespace))
        )
    flask_app = create_app_from_env()
    celery = flask_app.extensions["celery"]
    celery.conf.update(json.loads(os.environ.get("PLOINTS_CELERY_TEST_CELERY", "{}")))
