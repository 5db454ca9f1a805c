"""flask_ploints.replay: :func:`replay` and :func:`rerun` with sync dispatch,
on the stores that keep payloads (an SQLite file by URL, the same in the
app's own session, and Redis) and on those that do not.

Nothing here imports Celery: the handlers run inline, in this process.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import sessionmaker

from flask_ploints import Event
from flask_ploints import InvalidEvent
from flask_ploints import PlointsWebhooks
from flask_ploints import signals
from flask_ploints._cli import ploints
from flask_ploints._dispatch import Dispatcher
from flask_ploints._events import parse_event
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import replay
from flask_ploints.replay import rerun
from flask_ploints.stores import EventState
from flask_ploints.stores import InspectableStore
from flask_ploints.stores import MemoryStore
from flask_ploints.stores import RedisStore
from flask_ploints.stores import SessionStore
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .support import build_app

ROOT = Path(__file__).resolve().parent.parent


def _body(event_id: str = "evt_1") -> bytes:
    return json.dumps(
        build_event("points.earned", {"amount": 5}, id=event_id, timestamp="2025-06-15T10:30:00Z")
    ).encode()


class Handler:
    """The app's one handler: it raises on its first ``failures`` runs."""

    def __init__(self) -> None:
        self.failures = 0
        self.runs: list[str] = []
        self.raised: list[BaseException] = []

    def __call__(self, event: Event) -> None:
        self.runs.append(event.id)
        if len(self.runs) <= self.failures:
            error = RuntimeError(f"broken on {event.id}, run {len(self.runs)}")
            self.raised.append(error)
            raise error


@pytest.fixture(params=["sqlite", "session", "redis"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> dict[str, t.Any]:
    if request.param == "sqlite":
        return {"PLOINTS_DEDUPE_STORE": "sqlite:///" + str(tmp_path / "x.db")}
    if request.param == "session":
        # A failed re-run rolls its claim back with the handlers' writes,
        # and records the failure, with the payload, outside them.
        engine = sa.create_engine("sqlite:///" + str(tmp_path / "x.db"))
        return {"PLOINTS_DEDUPE_STORE": sessionmaker(engine)}
    redis_url: str = request.getfixturevalue("redis_url")
    return {"PLOINTS_DEDUPE_STORE": redis_url, "PLOINTS_REDIS_PREFIX": f"{unique}:"}


def _close(store: object) -> None:
    if isinstance(store, RedisStore):
        keys = list(store.client.scan_iter(match=store.prefix + "*", count=500))
        if keys:
            store.client.delete(*keys)
        store.client.close()
    elif isinstance(store, SQLAlchemyStore):
        store.close()
        store.engine.dispose()
    elif isinstance(store, SessionStore):
        store.session.get_bind().dispose()


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def app(store_config: dict[str, t.Any], handler: Handler) -> t.Iterator[Flask]:
    app, webhooks = build_app(store_config)
    webhooks.on_any(handler)
    yield app
    _close(app.extensions["ploints"]["ploints"].store)


def _store(app: Flask) -> InspectableStore:
    store = app.extensions["ploints"]["ploints"].store
    assert isinstance(store, InspectableStore)
    return store


def _failed(app: Flask, handler: Handler, event_id: str = "evt_1") -> bytes:
    """Leave ``event_id`` failed in the store by a run whose handler raised."""
    handler.failures += 1
    body = _body(event_id)
    assert rerun(app, body) is ReplayOutcome.FAILED
    return body


def test_the_app_dispatches_inline(app: Flask) -> None:
    dispatcher = app.extensions["ploints"]["ploints"].dispatcher
    assert isinstance(dispatcher, Dispatcher)
    assert dispatcher.runs_inline is True
    assert type(dispatcher).__module__ == "flask_ploints._dispatch"


def test_a_failed_run_is_recorded_with_its_payload(app: Flask, handler: Handler) -> None:
    body = _failed(app, handler)
    stored = _store(app).get("evt_1")
    assert stored is not None
    assert (stored.id, stored.status, stored.attempts, stored.payload) == (
        "evt_1",
        EventState.FAILED,
        1,
        body,
    )
    assert stored.error is not None
    assert stored.error.startswith("Traceback (most recent call last):\n")
    assert stored.error.endswith("RuntimeError: broken on evt_1, run 1\n")
    assert [event.id for event in _store(app).failed()] == ["evt_1"]
    assert handler.runs == ["evt_1"]


def test_a_failed_event_replays_to_processed(app: Flask, handler: Handler) -> None:
    body = _failed(app, handler)
    outcome = replay(app, "evt_1")
    assert outcome is ReplayOutcome.PROCESSED
    assert str(outcome) == "processed"
    assert handler.runs == ["evt_1", "evt_1"]
    stored = _store(app).get("evt_1")
    assert stored is not None
    # A done row keeps its payload in SQL; a done key in Redis drops it.
    kept = body if isinstance(_store(app), SQLAlchemyStore | SessionStore) else None
    assert (stored.status, stored.attempts, stored.payload) == (EventState.DONE, 2, kept)
    assert _store(app).failed() == []
    # Done: a delivery or a rerun of the same event is a duplicate, and
    # nothing runs.
    response = PlointsClient(app).send("points.earned", id="evt_1")
    assert (response.status_code, response.get_json()) == (
        200,
        {"received": True, "duplicate": True},
    )
    assert rerun(app, _body()) is ReplayOutcome.DUPLICATE
    assert handler.runs == ["evt_1", "evt_1"]


def test_a_replay_that_fails_again_records_the_new_traceback(app: Flask, handler: Handler) -> None:
    body = _failed(app, handler)
    handler.failures += 1
    assert replay(app, "evt_1") is ReplayOutcome.FAILED
    assert handler.runs == ["evt_1", "evt_1"]
    stored = _store(app).get("evt_1")
    assert stored is not None
    assert (stored.status, stored.attempts, stored.payload) == (EventState.FAILED, 2, body)
    assert stored.error is not None
    assert stored.error.startswith("Traceback (most recent call last):\n")
    assert stored.error.endswith("RuntimeError: broken on evt_1, run 2\n")
    assert "run 1" not in stored.error

    assert replay(app, "evt_1") is ReplayOutcome.PROCESSED
    done = _store(app).get("evt_1")
    assert done is not None
    assert (done.status, done.attempts) == (EventState.DONE, 3)
    assert handler.runs == ["evt_1", "evt_1", "evt_1"]


def test_replay_of_an_unknown_id(app: Flask, handler: Handler) -> None:
    with pytest.raises(LookupError) as caught:
        replay(app, "evt_unknown")
    assert str(caught.value) == "event 'evt_unknown' is not in the dedupe store"
    assert handler.runs == []


def test_replay_of_a_done_id(app: Flask, handler: Handler) -> None:
    assert rerun(app, _body()) is ReplayOutcome.PROCESSED
    with pytest.raises(ValueError) as caught:
        replay(app, "evt_1")
    assert str(caught.value) == "event 'evt_1' is done, not failed"
    assert handler.runs == ["evt_1"]


def test_replay_while_in_flight(app: Flask, handler: Handler) -> None:
    _failed(app, handler)
    claim = _store(app).claim("evt_1", 60, _body())
    with pytest.raises(ValueError) as caught:
        replay(app, "evt_1")
    assert str(caught.value) == "event 'evt_1' is in_flight, not failed"
    with pytest.raises(ValueError) as caught:
        rerun(app, _body())
    assert str(caught.value) == "event 'evt_1' is being processed right now"
    assert handler.runs == ["evt_1"]
    # The holder's claim is untouched.
    assert _store(app).commit("evt_1", claim.token, 60) is True


def test_rerun_of_an_invalid_body(app: Flask, handler: Handler) -> None:
    with pytest.raises(InvalidEvent) as caught:
        rerun(app, b"not json")
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == "body is not valid JSON"
    with pytest.raises(InvalidEvent) as caught:
        rerun(app, b"{}")
    assert str(caught.value) == "missing field 'id'"
    assert handler.runs == []
    assert _store(app).failed() == []


@pytest.mark.parametrize("function", [replay, rerun], ids=["replay", "rerun"])
def test_an_unknown_instance_name(
    app: Flask, handler: Handler, function: t.Callable[[Flask, t.Any, str], ReplayOutcome]
) -> None:
    argument: str | bytes = "evt_1" if function is replay else _body()
    with pytest.raises(RuntimeError) as caught:
        function(app, argument, "partner")
    assert str(caught.value) == (
        "PlointsWebhooks 'partner' is not registered on app 'ploints_test' (registered: ploints);"
        " did you forget to call init_app(app)?"
    )
    assert handler.runs == []


def test_replay_of_a_second_instance(tmp_path: Path) -> None:
    store = SQLAlchemyStore.from_url("sqlite:///" + str(tmp_path / "x.db"))
    app, _ = build_app()
    partner = PlointsWebhooks(app, name="partner", url="/partner", store=store)
    handler = Handler()
    partner.on_any(handler)
    try:
        handler.failures = 1
        assert rerun(app, _body(), name="partner") is ReplayOutcome.FAILED
        # The default instance has a store of its own, without the event.
        with pytest.raises(LookupError) as caught:
            replay(app, "evt_1")
        assert str(caught.value) == "event 'evt_1' is not in the dedupe store"
        assert replay(app, "evt_1", name="partner") is ReplayOutcome.PROCESSED
        assert handler.runs == ["evt_1", "evt_1"]
    finally:
        _close(store)


def test_a_store_without_payloads() -> None:
    app, webhooks = build_app({"PLOINTS_DEDUPE_STORE": MemoryStore()})
    handler = Handler()
    webhooks.on_any(handler)
    _failed(app, handler)
    stored = _store(app).get("evt_1")
    assert stored is not None
    assert (stored.status, stored.payload) == (EventState.FAILED, None)
    with pytest.raises(LookupError) as caught:
        replay(app, "evt_1")
    assert str(caught.value) == (
        "event 'evt_1' has no payload in the dedupe store; have Ploints resend it"
    )
    assert handler.runs == ["evt_1"]


def test_a_store_that_shows_nothing() -> None:
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": None})
    with pytest.raises(LookupError) as caught:
        replay(app, "evt_1")
    assert str(caught.value) == (
        "the dedupe store of 'ploints' (NullStore) does not show the events it holds, so failed"
        " events cannot be replayed; use RedisStore or SQLAlchemyStore"
    )


class Received:
    """Every send of one signal: (sender, kwargs)."""

    def __init__(self) -> None:
        self.sends: list[tuple[object, dict[str, t.Any]]] = []

    def __call__(self, sender: object, **kwargs: t.Any) -> None:
        self.sends.append((sender, kwargs))


def test_signals(app: Flask, handler: Handler) -> None:
    processed, failed, duplicate = Received(), Received(), Received()
    event = parse_event(_body())
    with (
        signals.event_processed.connected_to(processed, sender=app),
        signals.handler_failed.connected_to(failed, sender=app),
        signals.duplicate_skipped.connected_to(duplicate, sender=app),
    ):
        _failed(app, handler)
        assert processed.sends == []
        assert duplicate.sends == []
        [(sender, kwargs)] = failed.sends
        assert sender is app
        assert sorted(kwargs) == ["duration", "event", "exception", "name"]
        assert (kwargs["name"], kwargs["event"], kwargs["exception"]) == (
            "ploints",
            event,
            handler.raised[0],
        )
        assert isinstance(kwargs["duration"], float)
        assert kwargs["duration"] >= 0

        assert replay(app, "evt_1") is ReplayOutcome.PROCESSED
        [(sender, kwargs)] = processed.sends
        assert sender is app
        assert sorted(kwargs) == ["duration", "event", "name"]
        assert (kwargs["name"], kwargs["event"]) == ("ploints", event)
        assert isinstance(kwargs["duration"], float)
        assert kwargs["duration"] >= 0

        assert rerun(app, _body()) is ReplayOutcome.DUPLICATE
        assert duplicate.sends == [(app, {"name": "ploints", "event": event})]
        assert len(failed.sends) == 1
        assert len(processed.sends) == 1


def test_no_celery_is_imported(tmp_path: Path) -> None:
    # A fresh interpreter: in this one, other test modules may have imported
    # Celery already.
    code = f"""
import sys
import tests.test_replay as module
from tests.support import build_app
from flask_ploints.replay import replay
app, webhooks = build_app({{"PLOINTS_DEDUPE_STORE": {"sqlite:///" + str(tmp_path / "x.db")!r}}})
handler = module.Handler()
webhooks.on_any(handler)
module._failed(app, handler)
assert replay(app, "evt_1") == "processed", handler.runs
print(sorted(m for m in sys.modules if m.split(".")[0] in ("celery", "kombu")))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


@pytest.mark.parametrize(
    ("name", "account", "options"),
    [("ploints", None, ""), ("shop", None, " --name shop"), ("ploints", "m 1", " --account 'm 1'")],
)
def test_give_up_names_the_command_that_replays_the_event(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    account: str | None,
    options: str,
) -> None:
    handler = Handler()
    webhooks = PlointsWebhooks(name=name)
    webhooks.on("points.earned")(handler)
    config: dict[str, t.Any] = {"PLOINTS_DEDUPE_STORE": "sqlite:///" + str(tmp_path / "x.db")}
    if account is not None:
        config["PLOINTS_WEBHOOK_URL"] = "/webhooks/ploints/<account>"
        config["PLOINTS_WEBHOOK_SECRET"] = {account: "whsec_m1"}.get
    app = build_app(config, webhooks)[0]
    processor = webhooks.receiver(app).processor
    # An id a shell would split: the command quotes it.
    event = parse_event(_body("evt 1's"), account)
    claim = processor.store.claim(processor.namespace.key(event.id, account), 60, event.raw)
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        recorded = processor.give_up(
            app, event, claim.token, RuntimeError("boom"), attempts=3, handlers_ran=True
        )
    assert recorded is True
    (record,) = caplog.records
    message = record.getMessage()
    assert message == (
        """event "evt 1's" ('points.earned') failed after 3 attempt(s); recorded as failed:"""
        f""" replay it with: flask ploints replay 'evt 1'"'"'s'{options}"""
    )
    # The command, run as logged, replays the event.
    args = shlex.split(message.split("flask ploints ", 1)[1])
    result = app.test_cli_runner().invoke(ploints, args)
    assert (result.exit_code, result.output) == (0, "evt 1's: processed\n")
    assert handler.runs == ["evt 1's"]
