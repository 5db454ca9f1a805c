"""OpenTelemetry traces (``PLOINTS_OPENTELEMETRY``), read back from the
SDK's :class:`InMemorySpanExporter`.

Each test gives its app a :class:`TracerProvider` of its own through the
setting, so no test touches the global provider, except the one that shows
``True`` uses it: that provider is set once per session (the API allows it
once per process) and its exporter cleared per test.

What the tests show:

* ``test_delivery_span_per_outcome``: one ``ploints.deliver`` span per
  delivery with the event's id and type, the outcome, the duplicate and
  in-flight flags, and an ``ERROR`` status for failed and unavailable.
* ``test_incoming_trace_context_and_baggage``: with the app instrumented
  (the request's ``traceparent`` and ``baggage`` extracted by the global
  propagator, as opentelemetry-instrumentation-flask does), a delivery
  starts a new trace linked to the server span and its handlers see no
  baggage, unless ``PLOINTS_TRACE_CONTEXT = "join"``.
* ``test_delivery_span_joins_the_current_span_when_told``: with ``"join"``,
  a span the app opened around the request is the delivery span's parent.
* ``test_handler_spans``: a span per handler and per signal receiver, in
  the order they run, children of the delivery span; the one that raised
  records the exception with status ``ERROR``; those after it never ran.
* ``test_account_and_rerun``: an event's account is an attribute; a re-run
  is a ``ploints.rerun`` span.
* ``test_true_uses_the_global_provider``.
* ``test_off_emits_nothing_and_imports_nothing``: with the key off no span
  is made, the processor and handlers are the plain ones, and (in a fresh
  interpreter) neither :mod:`flask_ploints._tracing` nor OpenTelemetry is
  imported by a delivery.
* ``test_config_errors``: a wrong value, and opentelemetry-api missing.
* ``test_tracing_example``: ``docs/examples/tracing.py``, whose own span
  sits inside its handler's.
* ``test_celery_worker_joins_the_trace``: on a real worker (RabbitMQ), the
  ``ploints.process`` span of each attempt, a retry's included, and its
  handler spans sit in the trace of the delivery that queued the event
  (a fresh one, linked to the request's span), children of its delivery
  span.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import typing as t
from contextvars import Token
from pathlib import Path

import pytest
from flask import Flask
from flask import request
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from flask_ploints import ConfigError
from flask_ploints import Event
from flask_ploints import PlointsWarning
from flask_ploints import PlointsWebhooks
from flask_ploints import on
from flask_ploints._dispatch import Handlers
from flask_ploints._processing import Processor
from flask_ploints._signature import sign
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import replay
from flask_ploints.replay import rerun
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .celery_app import Recorder
from .celery_app import create_app
from .support import build_app
from .test_celery import Workers
from .test_celery import _until
from .test_celery import workers_and_recorder

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> t.Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture(scope="session")
def global_session_exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def global_exporter(global_session_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    global_session_exporter.clear()
    return global_session_exporter


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def _event_attributes(event_id: str, outcome: str, **flags: bool) -> dict[str, t.Any]:
    return {
        "ploints.event.id": event_id,
        "ploints.event.type": "points.earned",
        "ploints.outcome": outcome,
        "ploints.duplicate": flags.get("duplicate", False),
        "ploints.in_flight": flags.get("in_flight", False),
    }


def test_delivery_span_per_outcome(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    webhooks = PlointsWebhooks()

    @webhooks.on("points.earned")
    def earn(event: Event) -> None:
        if event.data.get("fail"):
            raise RuntimeError("broke")

    app, _ = build_app({"PLOINTS_OPENTELEMETRY": provider}, webhooks)
    client = PlointsClient(app)
    assert client.send("points.earned", id="evt_1").status_code == 200
    assert client.send("points.earned", id="evt_1").status_code == 200
    assert client.send("points.earned", {"fail": True}, id="evt_2").status_code == 500
    app.extensions["ploints"]["ploints"].store.claim("evt_3", 30.0)
    assert client.send("points.earned", id="evt_3").status_code == 409

    spans = _spans(exporter, "ploints.deliver")
    assert [dict(span.attributes or {}) for span in spans] == [
        _event_attributes("evt_1", "processed"),
        _event_attributes("evt_1", "duplicate", duplicate=True),
        _event_attributes("evt_2", "failed"),
        _event_attributes("evt_3", "in_flight", in_flight=True),
    ]
    assert [(span.status.status_code, span.status.description) for span in spans] == [
        (StatusCode.UNSET, None),
        (StatusCode.UNSET, None),
        (StatusCode.ERROR, "failed: RuntimeError('broke')"),
        (StatusCode.UNSET, None),
    ]
    assert {span.kind for span in spans} == {trace.SpanKind.INTERNAL}
    # Roots, each its own trace: the test opened no span and the app is not
    # instrumented.
    assert [span.parent for span in spans] == [None] * 4
    assert len({span.context.trace_id for span in spans if span.context}) == 4


def test_unavailable_span(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    app, _ = build_app(
        {"PLOINTS_OPENTELEMETRY": provider, "PLOINTS_DEDUPE_STORE": "redis://127.0.0.1:1/0"}
    )
    assert PlointsClient(app).send("points.earned", id="evt_down").status_code == 503
    [span] = exporter.get_finished_spans()
    assert span.name == "ploints.deliver"
    assert dict(span.attributes or {}) == _event_attributes("evt_down", "unavailable")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.status.description or "").startswith("unavailable: StoreError(")
    assert [(event.name, (event.attributes or {})["exception.type"]) for event in span.events] == [
        ("exception", "flask_ploints._errors.StoreError")
    ]


#: A caller's W3C trace context and baggage, as any client can send them.
INCOMING_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
INCOMING_HEADERS = {
    "traceparent": f"00-{INCOMING_TRACE_ID:032x}-00f067aa0ba902b7-01",
    "baggage": "tenant=acme,role=admin",
}


def _instrumented(app: Flask, provider: TracerProvider) -> None:
    """What opentelemetry-instrumentation-flask does to ``app``: before the
    view, extract the request's context with the global propagator (W3C
    trace context and baggage) and make a server span in it current.
    """
    tracer = provider.get_tracer("instrumentation")
    state: list[tuple[trace.Span, list[Token[otel_context.Context]]]] = []

    @app.before_request
    def start() -> None:
        tokens = [otel_context.attach(propagate.extract(request.headers))]
        span = tracer.start_span(f"POST {request.path}", kind=trace.SpanKind.SERVER)
        tokens.append(otel_context.attach(trace.set_span_in_context(span)))
        state.append((span, tokens))

    @app.teardown_request
    def end(error: BaseException | None) -> None:
        span, tokens = state.pop()
        span.end()
        for token in reversed(tokens):
            otel_context.detach(token)


@pytest.mark.parametrize("setting", [None, "fresh", "join"])
def test_incoming_trace_context_and_baggage(
    provider: TracerProvider, exporter: InMemorySpanExporter, setting: str | None
) -> None:
    webhooks = PlointsWebhooks()
    seen: list[tuple[dict[str, object], int]] = []

    @webhooks.on("points.earned")
    def earned(event: Event) -> None:
        seen.append((dict(baggage.get_all()), trace.get_current_span().get_span_context().trace_id))

    config: dict[str, t.Any] = {"PLOINTS_OPENTELEMETRY": provider}
    if setting is not None:
        config["PLOINTS_TRACE_CONTEXT"] = setting
    app, _ = build_app(config, webhooks)
    _instrumented(app, provider)
    body = build_event("points.earned", id="evt_1")
    response = PlointsClient(app).post(body, headers=INCOMING_HEADERS)
    assert response.status_code == 200

    [server] = [span for span in exporter.get_finished_spans() if span.name.startswith("POST")]
    [deliver] = _spans(exporter, "ploints.deliver")
    [handler] = _spans(exporter, "test_incoming_trace_context_and_baggage.<locals>.earned")
    assert server.context is not None and deliver.context is not None
    # The instrumentation's own span joins the caller's trace either way.
    assert server.context.trace_id == INCOMING_TRACE_ID
    assert handler.parent is not None and handler.parent.span_id == deliver.context.span_id
    if setting == "join":
        assert deliver.parent is not None and deliver.parent.span_id == server.context.span_id
        assert deliver.context.trace_id == INCOMING_TRACE_ID
        assert list(deliver.links) == []
        assert seen == [({"tenant": "acme", "role": "admin"}, INCOMING_TRACE_ID)]
    else:
        # Fresh, the default: a new trace, the caller's span only a link,
        # and none of the caller's baggage.
        assert deliver.parent is None
        assert deliver.context.trace_id != INCOMING_TRACE_ID
        assert [link.context.span_id for link in deliver.links] == [server.context.span_id]
        assert seen == [({}, deliver.context.trace_id)]


def test_delivery_span_joins_the_current_span_when_told(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app, _ = build_app({"PLOINTS_OPENTELEMETRY": provider, "PLOINTS_TRACE_CONTEXT": "join"})
    # Stands for any span the app opened around the request.
    with provider.get_tracer("test").start_as_current_span("POST /webhooks/ploints") as request:
        assert PlointsClient(app).send("points.earned", id="evt_1").status_code == 200
    [deliver] = _spans(exporter, "ploints.deliver")
    assert deliver.parent is not None and deliver.context is not None
    assert deliver.parent.span_id == request.get_span_context().span_id
    assert deliver.context.trace_id == request.get_span_context().trace_id


def test_handler_spans(
    provider: TracerProvider, exporter: InMemorySpanExporter, restore_signals: None
) -> None:
    webhooks = PlointsWebhooks()
    ran: list[str] = []

    @webhooks.on("points.earned")
    def earned(event: Event) -> None:
        ran.append("earned")

    @on("points.earned")
    def announce(event: Event) -> None:
        ran.append("announce")
        if event.data.get("fail"):
            raise RuntimeError("announce broke")

    @webhooks.on_any
    def audit(event: Event) -> None:
        ran.append("audit")

    app, _ = build_app({"PLOINTS_OPENTELEMETRY": provider}, webhooks)
    client = PlointsClient(app)
    assert client.send("points.earned", id="evt_ok").status_code == 200
    assert client.send("points.earned", {"fail": True}, id="evt_fail").status_code == 500
    assert ran == ["earned", "announce", "audit", "earned", "announce"]

    prefix = "test_handler_spans.<locals>."
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == [
        f"{prefix}earned",
        f"{prefix}announce",
        f"{prefix}audit",
        "ploints.deliver",
        f"{prefix}earned",
        f"{prefix}announce",
        "ploints.deliver",
    ]
    assert dict(spans[1].attributes or {}) == {
        "code.function.name": f"tests.test_tracing.{prefix}announce"
    }
    for handlers, deliver in ((spans[0:3], spans[3]), (spans[4:6], spans[6])):
        assert deliver.context is not None
        assert [span.parent.span_id if span.parent else None for span in handlers] == [
            deliver.context.span_id
        ] * len(handlers)
    assert [span.status.status_code for span in spans[:3]] == [StatusCode.UNSET] * 3
    failed = spans[5]
    assert (failed.status.status_code, failed.status.description) == (
        StatusCode.ERROR,
        "RuntimeError: announce broke",
    )
    [exception] = failed.events
    assert exception.name == "exception"
    attributes = exception.attributes or {}
    assert (attributes["exception.type"], attributes["exception.message"]) == (
        "RuntimeError",
        "announce broke",
    )
    assert spans[4].status.status_code is StatusCode.UNSET
    assert dict(spans[6].attributes or {}) == _event_attributes("evt_fail", "failed")


def test_account_and_rerun(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # An endpoint for many accounts: the event's account is an attribute.
    app, _ = build_app(
        {
            "PLOINTS_OPENTELEMETRY": provider,
            "PLOINTS_WEBHOOK_URL": "/webhooks/ploints/<account>",
            "PLOINTS_WEBHOOK_SECRET": {"acct_1": "whsec_acct_1"}.get,
        }
    )
    body = json.dumps(build_event("points.earned", id="evt_acct")).encode()
    response = app.test_client().post(
        "/webhooks/ploints/acct_1",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Ploints-Signature": sign(body, "whsec_acct_1"),
        },
    )
    assert response.status_code == 200
    again = json.dumps(build_event("points.earned", id="evt_again")).encode()
    assert rerun(app, again, account="acct_1") == "processed"
    deliver, rerun_span = exporter.get_finished_spans()
    assert (deliver.name, dict(deliver.attributes or {})) == (
        "ploints.deliver",
        {**_event_attributes("evt_acct", "processed"), "ploints.account": "acct_1"},
    )
    assert (rerun_span.name, dict(rerun_span.attributes or {})) == (
        "ploints.rerun",
        {**_event_attributes("evt_again", "processed"), "ploints.account": "acct_1"},
    )


def test_true_uses_the_global_provider(global_exporter: InMemorySpanExporter) -> None:
    app, _ = build_app({"PLOINTS_OPENTELEMETRY": True})
    assert PlointsClient(app).send("points.earned", id="evt_global").status_code == 200
    [span] = global_exporter.get_finished_spans()
    assert (span.name, dict(span.attributes or {})) == (
        "ploints.deliver",
        _event_attributes("evt_global", "processed"),
    )
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "flask_ploints"


def test_off_emits_nothing_and_imports_nothing(
    provider: TracerProvider, exporter: InMemorySpanExporter, global_exporter: InMemorySpanExporter
) -> None:
    webhooks = PlointsWebhooks()
    app, _ = build_app({}, webhooks)
    receiver = app.extensions["ploints"]["ploints"]
    assert type(receiver.processor) is Processor
    assert type(receiver.processor.handlers) is Handlers
    assert receiver.processor.handlers is webhooks.handlers
    with provider.get_tracer("test").start_as_current_span("request"):
        assert PlointsClient(app).send("points.earned", id="evt_off").status_code == 200
    assert [span.name for span in exporter.get_finished_spans()] == ["request"]
    assert global_exporter.get_finished_spans() == ()

    script = (
        "import sys\n"
        "from tests.support import build_app\n"
        "from flask_ploints.testing import PlointsClient\n"
        "app, _ = build_app()\n"
        "assert PlointsClient(app).send('points.earned').status_code == 200\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'flask_ploints._tracing'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")


def test_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as wrong:
        build_app({"PLOINTS_OPENTELEMETRY": "yes"})
    assert str(wrong.value) == (
        "PLOINTS_OPENTELEMETRY must be True, False or an OpenTelemetry TracerProvider, not 'yes'"
    )
    for value in ("yes", ["join"]):
        with pytest.raises(ConfigError) as wrong:
            build_app({"PLOINTS_OPENTELEMETRY": True, "PLOINTS_TRACE_CONTEXT": value})
        shown = "'yes'" if value == "yes" else "a list"
        assert str(wrong.value) == f"PLOINTS_TRACE_CONTEXT must be 'fresh' or 'join', not {shown}"
    # As if opentelemetry-api were not installed: importing it fails.
    monkeypatch.delitem(sys.modules, "flask_ploints._tracing", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigError) as missing:
        build_app({"PLOINTS_OPENTELEMETRY": True})
    assert str(missing.value) == (
        "PLOINTS_OPENTELEMETRY needs opentelemetry-api; install it with:"
        " pip install 'flask-ploints[otel]'"
    )


@pytest.fixture
def workers(
    amqp_url: str, redis_url: str, unique: str, tmp_path: Path
) -> t.Iterator[tuple[Workers, Recorder]]:
    yield from workers_and_recorder(amqp_url, redis_url, unique, tmp_path)


def test_celery_worker_joins_the_trace(
    workers: tuple[Workers, Recorder], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    workers_, recorder = workers
    # The worker traces with the global provider of its process, which
    # writes its spans to Redis; one retry, soon.
    workers_.config = {
        "PLOINTS_OPENTELEMETRY": True,
        "PLOINTS_CELERY_MAX_RETRIES": 1,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
    }
    app = create_app(
        workers_.amqp_url,
        workers_.redis_url,
        workers_.namespace,
        {**workers_.config, "PLOINTS_OPENTELEMETRY": provider},
    )
    client = PlointsClient(app)
    try:
        with provider.get_tracer("test").start_as_current_span("request") as request:
            assert client.send("points.earned", {"fail": True}, id="evt_1").status_code == 202
        # Started after the publish: see test_celery.test_failing_handler_gives_up_then_replays.
        workers_.start()
        _until(lambda: recorder.count("handler_failed") == {"evt_1": 1}, "the worker to give up")
        recorder.fix()
        assert replay(app, "evt_1") == ReplayOutcome.QUEUED
        _until(lambda: recorder.count("event_processed") == {"evt_1": 1}, "the replayed run")
    finally:
        receiver = app.extensions["ploints"]["ploints"]
        receiver.dispatcher.close()
        receiver.store.client.close()

    assert [span.name for span in exporter.get_finished_spans()] == [
        "ploints.deliver",
        "request",
        "ploints.rerun",
    ]
    [deliver] = _spans(exporter, "ploints.deliver")
    [rerun_span] = _spans(exporter, "ploints.rerun")
    assert (deliver.name, (deliver.attributes or {})["ploints.outcome"]) == (
        "ploints.deliver",
        "queued",
    )
    assert (rerun_span.name, (rerun_span.attributes or {})["ploints.outcome"]) == (
        "ploints.rerun",
        "queued",
    )
    assert deliver.context is not None and rerun_span.context is not None
    # A fresh trace, linked to the request's span.
    assert deliver.parent is None
    assert [link.context.span_id for link in deliver.links] == [request.get_span_context().span_id]

    # The worker's spans, in the order they ended: per attempt, its
    # handler's span then its own, each attempt (the retry's too) a child
    # of the span that queued it, in that span's trace.
    spans = recorder.spans()
    handler = "create_app.<locals>.handle"
    assert [
        (span["name"], span["attributes"].get("ploints.outcome"), span["status"]) for span in spans
    ] == [
        (handler, None, "ERROR"),
        ("ploints.process", "failed", "ERROR"),
        (handler, None, "ERROR"),
        ("ploints.process", "failed", "ERROR"),
        (handler, None, "UNSET"),
        ("ploints.process", "processed", "UNSET"),
    ]
    queued_by = [deliver.context, deliver.context, rerun_span.context]
    for number, context in enumerate(queued_by):
        handler_span, process = spans[2 * number : 2 * number + 2]
        assert (process["trace_id"], process["parent_id"]) == (
            f"{context.trace_id:032x}",
            f"{context.span_id:016x}",
        )
        assert (handler_span["trace_id"], handler_span["parent_id"]) == (
            process["trace_id"],
            process["span_id"],
        )
        assert process["attributes"]["ploints.event.id"] == "evt_1"
    assert spans[0]["events"] == ["exception"]


def test_tracing_example(global_exporter: InMemorySpanExporter) -> None:
    spec = importlib.util.spec_from_file_location("docs_example_tracing", EXAMPLES / "tracing.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    # The example runs outside testing, so the memory store warns.
    with pytest.warns(PlointsWarning, match="MemoryStore"):
        spec.loader.exec_module(example)
    client = PlointsClient(example.app)
    data = {"customerEmail": "jane@example.com", "amount": 50, "newBalance": 350}
    assert client.send("points.earned", data, id="evt_example").status_code == 200
    assert example.balances == {"jane@example.com": 350}
    own, handler, deliver = global_exporter.get_finished_spans()
    assert (own.name, dict(own.attributes or {})) == (
        "update balance",
        {"app.customer": "jane@example.com"},
    )
    assert (handler.name, deliver.name) == ("award", "ploints.deliver")
    assert own.parent is not None and handler.parent is not None
    assert handler.context is not None and deliver.context is not None
    assert (own.parent.span_id, handler.parent.span_id) == (
        handler.context.span_id,
        deliver.context.span_id,
    )
