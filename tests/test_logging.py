"""Structured logs: every record the extension writes about an event or a
delivery carries the fields of :mod:`flask_ploints._logfields` as ``extra``.

What the tests show:

* ``test_records_carry_the_event_fields``: through the endpoint, the
  records of a processed event, a duplicate, an in-flight copy, a handler
  failure, a queued event, an ``after_commit`` call that raised, and a
  rejected signature have each field with its exact value (a duration is
  the one the signals were given); the message texts are unchanged.
* ``test_store_down_and_accounts``: an unavailable store's record; on an
  endpoint for many accounts, the event's account, or for a refused
  delivery the URL's, is ``ploints_account``.
* ``test_observer_that_raises``: a lifecycle receiver's failure is logged
  with the fields of the event it was told about.
* ``test_worker_records``: a Celery worker's records (a retry, the end of
  the attempts) carry the fields too, read from the worker through Redis.
* ``test_json_logs_example``: ``docs/examples/json_logs.py`` writes JSON
  lines that hold the fields.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import types
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWarning
from flask_ploints import PlointsWebhooks
from flask_ploints import after_commit
from flask_ploints import signals
from flask_ploints._logfields import FIELDS
from flask_ploints._signature import sign
from flask_ploints.stores import Claim
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .celery_app import Recorder
from .celery_app import create_app
from .support import build_app
from .test_celery import Workers
from .test_celery import _until
from .test_celery import workers_and_recorder

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _fields(record: logging.LogRecord) -> dict[str, t.Any]:
    return {name: getattr(record, name) for name in FIELDS}


def _expected(
    event_id: str | None,
    outcome: str | None,
    duration: float | None = None,
    event_type: str | None = "points.earned",
    account: str | None = None,
) -> dict[str, t.Any]:
    return {
        "ploints_event_id": event_id,
        "ploints_event_type": event_type if event_id is not None else None,
        "ploints_account": account,
        "ploints_outcome": outcome,
        "ploints_duration": duration,
    }


class _Queue:
    """A dispatcher that hands events to a list: ``queued`` without a
    broker.
    """

    runs_inline = False
    lease = 30.0

    def __init__(self) -> None:
        self.events: list[str] = []

    def dispatch(self, app: Flask, event: Event, claim: Claim, name: str) -> None:
        self.events.append(event.id)


def test_records_carry_the_event_fields(caplog: pytest.LogCaptureFixture) -> None:
    webhooks = PlointsWebhooks()

    @webhooks.on("points.earned")
    def earn(event: Event) -> None:
        if event.data.get("fail"):
            raise RuntimeError("broke")
        if event.data.get("email"):
            after_commit(_raise)

    app, _ = build_app({}, webhooks)
    queue = _Queue()
    PlointsWebhooks(app, name="queued", url="/queued", dispatch=queue)
    durations: list[float] = []

    def took(sender: Flask, *, duration: float, **extra: t.Any) -> None:
        durations.append(duration)

    client = PlointsClient(app)
    app.extensions["ploints"]["ploints"].store.claim("evt_busy", 30.0)
    caplog.set_level(logging.INFO, "flask_ploints")
    with (
        signals.event_processed.connected_to(took, sender=app),
        signals.handler_failed.connected_to(took, sender=app),
    ):
        assert client.send("points.earned", id="evt_1").status_code == 200
        assert client.send("points.earned", id="evt_1").status_code == 200
        assert client.send("points.earned", id="evt_busy").status_code == 409
        assert client.send("points.earned", {"fail": True}, id="evt_2").status_code == 500
        assert client.send("points.earned", {"email": True}, id="evt_3").status_code == 200
        assert PlointsClient(app, "queued").send("points.earned", id="evt_4").status_code == 202
        client.secret = "whsec_wrong"
        assert client.send("points.earned", id="evt_5").status_code == 401

    assert queue.events == ["evt_4"]
    assert [(record.getMessage(), _fields(record)) for record in caplog.records] == [
        (
            "event 'evt_1' ('points.earned') processed",
            _expected("evt_1", "processed", durations[0]),
        ),
        ("event 'evt_1' ('points.earned') skipped: duplicate", _expected("evt_1", "duplicate")),
        (
            "event 'evt_busy' ('points.earned') skipped: in flight",
            _expected("evt_busy", "in_flight"),
        ),
        (
            "event 'evt_2' ('points.earned') failed: a handler raised RuntimeError('broke')",
            _expected("evt_2", "failed", durations[1]),
        ),
        (
            "event 'evt_3' ('points.earned') processed",
            _expected("evt_3", "processed", durations[2]),
        ),
        ("event 'evt_3': an after_commit call raised", _expected("evt_3", "processed")),
        ("event 'evt_4' ('points.earned') queued", _expected("evt_4", "queued")),
        ("rejected a delivery: invalid signature", _expected(None, "rejected")),
    ]
    assert [type(value) for value in durations] == [float, float, float]


def _raise() -> None:
    raise RuntimeError("mail server down")


def test_store_down_and_accounts(caplog: pytest.LogCaptureFixture) -> None:
    down, _ = build_app({"PLOINTS_DEDUPE_STORE": "redis://127.0.0.1:1/0"})
    # An endpoint for many accounts: a record names the event's account, or
    # the URL's for a delivery refused before it became an event.
    app, _ = build_app(
        {
            "PLOINTS_WEBHOOK_URL": "/webhooks/ploints/<account>",
            "PLOINTS_WEBHOOK_SECRET": {"acct_1": "whsec_acct_1"}.get,
        }
    )
    body = json.dumps(build_event("customer.created", id="evt_acct")).encode()

    def post(account: str, secret: str) -> int:
        headers = {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, secret)}
        url = f"/webhooks/ploints/{account}"
        return app.test_client().post(url, data=body, headers=headers).status_code

    caplog.set_level(logging.INFO, "flask_ploints")
    assert PlointsClient(down).send("points.earned", id="evt_down").status_code == 503
    assert post("acct_1", "whsec_acct_1") == 200
    assert post("acct_1", "whsec_wrong") == 401
    assert post("acct_2", "whsec_acct_1") == 401
    down_record, processed, wrong, unknown = caplog.records
    assert (down_record.getMessage(), _fields(down_record)) == (
        "event 'evt_down' ('points.earned') not claimed: the dedupe store failed",
        _expected("evt_down", "unavailable"),
    )
    assert processed.getMessage() == "event 'evt_acct' ('customer.created') processed"
    assert type(processed.ploints_duration) is float
    assert _fields(processed) == _expected(
        "evt_acct",
        "processed",
        processed.ploints_duration,
        event_type="customer.created",
        account="acct_1",
    )
    assert (wrong.getMessage(), _fields(wrong)) == (
        "rejected a delivery: invalid signature",
        _expected(None, "rejected", account="acct_1"),
    )
    assert (unknown.getMessage(), _fields(unknown)) == (
        "rejected a delivery: unknown account 'acct_2'",
        _expected(None, "rejected", account="acct_2"),
    )


def test_observer_that_raises(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build_app()
    durations: list[float] = []

    def broken(sender: Flask, *, duration: float, **extra: t.Any) -> None:
        durations.append(duration)
        raise RuntimeError("metrics down")

    caplog.set_level(logging.ERROR, "flask_ploints")
    with signals.event_processed.connected_to(broken, sender=app):
        assert PlointsClient(app).send("points.earned", id="evt_1").status_code == 200
    [record] = caplog.records
    assert (record.getMessage(), _fields(record)) == (
        "a receiver of ploints.event-processed raised",
        _expected("evt_1", "processed", durations[0]),
    )


@pytest.fixture
def workers(
    amqp_url: str, redis_url: str, unique: str, tmp_path: Path
) -> t.Iterator[tuple[Workers, Recorder]]:
    yield from workers_and_recorder(amqp_url, redis_url, unique, tmp_path)


def test_worker_records(workers: tuple[Workers, Recorder]) -> None:
    workers_, recorder = workers
    # The worker writes its flask_ploints records, with their fields, to
    # Redis (see tests/celery_app.py); one retry, soon.
    workers_.config = {
        "TEST_RECORD_LOGS": True,
        "PLOINTS_CELERY_MAX_RETRIES": 1,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
    }
    app = create_app(workers_.amqp_url, workers_.redis_url, workers_.namespace, workers_.config)
    try:
        client = PlointsClient(app)
        assert client.send("points.earned", {"fail": True}, id="evt_1").status_code == 202
        # Started after the publish: see test_celery.test_failing_handler_gives_up_then_replays.
        workers_.start()
        _until(lambda: recorder.count("handler_failed") == {"evt_1": 1}, "the worker to give up")
    finally:
        receiver = app.extensions["ploints"]["ploints"]
        receiver.dispatcher.close()
        receiver.store.client.close()
    records = recorder.logs()
    durations = [record["ploints_duration"] for record in records]
    assert [(record["message"], {name: record[name] for name in FIELDS}) for record in records] == [
        (
            "event 'evt_1' ('points.earned') failed (attempt 1 of 2); retrying in 0.2 s:"
            " RuntimeError('handler broke on purpose on evt_1')",
            _expected("evt_1", "failed", durations[0]),
        ),
        (
            "event 'evt_1' ('points.earned') failed after 2 attempt(s); recorded as failed:"
            " replay it with: flask ploints replay evt_1",
            _expected("evt_1", "failed", durations[1]),
        ),
    ]
    assert [type(value) for value in durations] == [float, float]


def _load_example(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # The example runs outside testing, so the memory store warns.
    with pytest.warns(PlointsWarning, match="MemoryStore"):
        spec.loader.exec_module(module)
    return module


def test_json_logs_example() -> None:
    example = _load_example("json_logs")
    stream = io.StringIO()
    logger = logging.getLogger("flask_ploints")
    level = logger.level
    handler = example.log_as_json(stream)
    try:
        client = PlointsClient(example.app)
        assert client.send("points.earned", id="evt_json").status_code == 200
        assert client.send("points.earned", id="evt_json").status_code == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    processed, duplicate = (json.loads(line) for line in stream.getvalue().splitlines())
    assert type(processed["ploints_duration"]) is float
    assert {key: value for key, value in processed.items() if key != "asctime"} == {
        "levelname": "INFO",
        "name": "flask_ploints",
        "message": "event 'evt_json' ('points.earned') processed",
        **_expected("evt_json", "processed", processed["ploints_duration"]),
    }
    assert {key: value for key, value in duplicate.items() if key != "asctime"} == {
        "levelname": "INFO",
        "name": "flask_ploints",
        "message": "event 'evt_json' ('points.earned') skipped: duplicate",
        **_expected("evt_json", "duplicate"),
    }
