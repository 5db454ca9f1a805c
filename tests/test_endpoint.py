"""Every answer the endpoint gives, one named test each."""

from __future__ import annotations

import io
import json
import threading
import typing as t

import pytest
from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints._signature import sign
from flask_ploints._views import WebhookEndpoint
from flask_ploints.stores import MemoryStore
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .support import SECRET
from .support import build_app

URL = "/webhooks/ploints"


def _signed(body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, SECRET)}


def test_200_processed(ploints_client: PlointsClient, calls: list[tuple[str, str]]) -> None:
    response = ploints_client.send("points.earned", id="evt_1")
    assert response.status_code == 200
    assert response.get_json() == {"received": True}
    assert calls == [("points.earned", "evt_1")]


def test_200_duplicate_runs_no_handler(
    ploints_client: PlointsClient, calls: list[tuple[str, str]]
) -> None:
    ploints_client.send("points.earned", id="evt_1")
    response = ploints_client.send("points.earned", id="evt_1")
    assert response.status_code == 200
    assert response.get_json() == {"received": True, "duplicate": True}
    assert calls == [("points.earned", "evt_1")]


def test_200_unknown_type_reaches_on_any_only(
    webhooks: PlointsWebhooks, ploints_client: PlointsClient, calls: list[tuple[str, str]]
) -> None:
    typed: list[str] = []
    webhooks.on("points.earned")(lambda event: typed.append(event.id))
    response = ploints_client.send("points.expired", {"amount": 5}, id="evt_new")
    assert response.status_code == 200
    assert response.get_json() == {"received": True}
    assert calls == [("points.expired", "evt_new")]
    assert typed == []


def test_200_known_type_without_handler(app: Flask) -> None:
    response = PlointsClient(app).send("badge.issued", id="evt_1")
    assert response.status_code == 200
    assert response.get_json() == {"received": True}


def test_400_invalid_event(ploints_client: PlointsClient, calls: list[tuple[str, str]]) -> None:
    response = ploints_client.post(b'{"id": "evt_1"}')
    assert response.status_code == 400
    assert response.get_json() == {"error": "missing field 'type'"}
    assert calls == []


def test_401_invalid_signature(ploints_client: PlointsClient, calls: list[tuple[str, str]]) -> None:
    response = ploints_client.post(build_event("points.earned"), signature="0" * 64)
    assert response.status_code == 401
    assert response.get_json() == {"error": "invalid signature"}
    assert calls == []


def test_401_body_never_echoed(app: Flask) -> None:
    body = json.dumps(build_event("points.earned", {"note": "secret-ish"})).encode()
    response = app.test_client().post(
        URL, data=body, headers={"Content-Type": "application/json", "X-Ploints-Signature": "x"}
    )
    assert response.status_code == 401
    assert b"secret-ish" not in response.data
    assert SECRET.encode() not in response.data
    assert sign(body, SECRET).encode() not in response.data


def test_403_https_required(make_https_app: Flask) -> None:
    response = PlointsClient(make_https_app).send("points.earned")
    assert response.status_code == 403
    assert response.get_json() == {"error": "HTTPS required"}


def test_https_required_accepts_https() -> None:
    app, _ = build_app({"PLOINTS_REQUIRE_HTTPS": True})
    client = PlointsClient(app)
    body = json.dumps(build_event("points.earned")).encode()
    response = client.client.post(
        URL, data=body, headers=_signed(body), base_url="https://localhost"
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "method", [m for m in WebhookEndpoint.methods if m not in ("POST", "HEAD")]
)
def test_405_not_post(app: Flask, method: str) -> None:
    response = app.test_client().open(URL, method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.get_json() == {"error": "method not allowed"}


def test_405_head_has_no_body(app: Flask) -> None:
    response = app.test_client().head(URL)
    assert (response.status_code, response.headers["Allow"], response.data) == (405, "POST", b"")


def test_the_registry_methods_include_options_trace_and_webdav() -> None:
    assert {"OPTIONS", "TRACE", "PROPFIND", "MKCOL", "LOCK", "COPY", "MOVE"} <= set(
        WebhookEndpoint.methods
    )


def test_409_in_flight_duplicate(webhooks: PlointsWebhooks, app: Flask) -> None:
    entered = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    @webhooks.on("points.earned")
    def slow(event: Event) -> None:
        runs.append(event.id)
        entered.set()
        release.wait(5)

    first: list[int] = []
    thread = threading.Thread(
        target=lambda: first.append(
            PlointsClient(app).send("points.earned", id="evt_1").status_code
        )
    )
    thread.start()
    assert entered.wait(5)
    response = PlointsClient(app).send("points.earned", id="evt_1")
    release.set()
    thread.join(5)
    assert response.status_code == 409
    assert response.get_json() == {"error": "event is being processed"}
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert first == [200]
    assert runs == ["evt_1"]


def test_413_body_too_large(app: Flask, calls: list[tuple[str, str]]) -> None:
    body = json.dumps(build_event("points.earned", {"blob": "x" * (1024 * 1024)})).encode()
    response = app.test_client().post(URL, data=body, headers=_signed(body))
    assert response.status_code == 413
    assert response.get_json() == {"error": "body larger than 1048576 bytes"}
    assert calls == []


class _CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.served = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.served += len(chunk)
        return chunk

    def readinto(self, buffer: t.Any) -> int:
        count = super().readinto(buffer)
        self.served += count
        return count


def test_413_body_without_length_is_not_read_whole(
    calls: list[tuple[str, str]], webhooks: PlointsWebhooks
) -> None:
    app, _ = build_app({"PLOINTS_WEBHOOK_MAX_BYTES": 1000}, webhooks)
    body = json.dumps(build_event("points.earned", {"blob": "x" * 10_000_000})).encode()
    stream = _CountingStream(body)
    response = app.test_client().post(
        URL,
        input_stream=stream,
        headers={**_signed(body), "Transfer-Encoding": "chunked"},
        # Set by servers that de-chunk the body (gunicorn, werkzeug's own).
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert stream.served < 1_000_000
    assert calls == []


def test_411_chunked_body_the_server_did_not_pass_on(
    app: Flask, calls: list[tuple[str, str]]
) -> None:
    body = json.dumps(build_event("points.earned")).encode()
    response = app.test_client().post(
        URL,
        input_stream=io.BytesIO(b""),
        headers={**_signed(body), "Transfer-Encoding": "chunked"},
        # As uWSGI's --http-socket leaves it: no length, not terminated.
        environ_overrides={"wsgi.input_terminated": False},
    )
    assert response.status_code == 411
    assert response.get_json() == {
        "error": "the server passed on no chunked body: send a Content-Length"
    }
    assert calls == []


@pytest.mark.parametrize("terminated", [False, True], ids=["plain", "input-terminated"])
def test_400_body_shorter_than_content_length(
    app: Flask, calls: list[tuple[str, str]], terminated: bool
) -> None:
    body = json.dumps(build_event("points.earned", id="evt_short")).encode()
    # The client went away after part of the body: a signed prefix is still
    # not verified as the whole event. A server that terminates the input
    # itself (gunicorn) sets wsgi.input_terminated, and werkzeug then reads
    # to the end of its stream instead of counting to Content-Length.
    overrides: dict[str, t.Any] = {"CONTENT_LENGTH": str(len(body))}
    if terminated:
        overrides["wsgi.input_terminated"] = True
    response = app.test_client().post(
        URL, input_stream=io.BytesIO(body[:-10]), headers=_signed(body), environ_overrides=overrides
    )
    assert response.status_code == 400
    assert response.get_json() == {"error": "body shorter than Content-Length"}
    assert calls == []


def test_body_is_read_to_content_length_only(app: Flask, calls: list[tuple[str, str]]) -> None:
    body = json.dumps(build_event("points.earned", id="evt_exact")).encode()
    stream = _CountingStream(body + b"GET / HTTP/1.1\r\n")
    response = app.test_client().post(
        URL,
        input_stream=stream,
        headers=_signed(body),
        environ_overrides={"CONTENT_LENGTH": str(len(body))},
    )
    assert response.status_code == 200
    assert stream.served == len(body)
    assert calls == [("points.earned", "evt_exact")]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_415_not_json(app: Flask, content_type: str | None) -> None:
    body = json.dumps(build_event("points.earned")).encode()
    headers = {"X-Ploints-Signature": sign(body, SECRET)}
    if content_type:
        headers["Content-Type"] = content_type
    response = app.test_client().post(URL, data=body, headers=headers)
    assert response.status_code == 415
    assert response.get_json() == {"error": "Content-Type must be application/json"}


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.ploints+json"]
)
def test_json_content_types_accepted(app: Flask, content_type: str) -> None:
    body = json.dumps(build_event("points.earned")).encode()
    response = app.test_client().post(
        URL, data=body, headers={**_signed(body), "Content-Type": content_type}
    )
    assert response.status_code == 200


def test_500_handler_failure_releases_the_claim(
    webhooks: PlointsWebhooks, app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[str] = []

    @webhooks.on("points.earned")
    def flaky(event: Event) -> None:
        attempts.append(event.id)
        if len(attempts) == 1:
            raise RuntimeError("database is down")

    client = PlointsClient(app)
    failed = client.send("points.earned", id="evt_1")
    assert failed.status_code == 500
    assert failed.get_json() == {"error": "handler failed"}
    assert b"database is down" not in failed.data
    retried = client.send("points.earned", id="evt_1")
    assert retried.status_code == 200
    assert retried.get_json() == {"received": True}
    assert attempts == ["evt_1", "evt_1"]
    failure = next(r for r in caplog.records if r.levelname == "ERROR")
    assert failure.name == "flask_ploints"
    assert failure.getMessage().startswith("event 'evt_1' ('points.earned') failed")
    assert failure.exc_info is not None
    assert str(failure.exc_info[1]) == "database is down"


class _BrokenStore(MemoryStore):
    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing

    def claim(self, event_id: str, lease: float, payload: bytes | None = None):  # type: ignore[no-untyped-def]
        if self.failing == "claim":
            raise ConnectionError("store down")
        return super().claim(event_id, lease, payload)

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        if self.failing == "commit":
            raise ConnectionError("store down")
        return super().commit(event_id, token, retention)


def test_503_store_down(calls: list[tuple[str, str]], webhooks: PlointsWebhooks) -> None:
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": _BrokenStore("claim")}, webhooks)
    response = PlointsClient(app).send("points.earned", id="evt_1")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "60"
    assert response.get_json() == {"error": "dedupe store unavailable"}
    assert calls == []


def test_commit_failure_after_handlers_still_answers_200(
    calls: list[tuple[str, str]], webhooks: PlointsWebhooks, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": _BrokenStore("commit")}, webhooks)
    response = PlointsClient(app).send("points.earned", id="evt_1")
    assert response.status_code == 200
    assert calls == [("points.earned", "evt_1")]
    assert (
        "event 'evt_1' ('points.earned') processed, but the dedupe store failed to commit it"
        in caplog.text
    )


def test_no_dedupe_with_store_none(calls: list[tuple[str, str]], webhooks: PlointsWebhooks) -> None:
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": None}, webhooks)
    client = PlointsClient(app)
    assert client.send("points.earned", id="evt_1").status_code == 200
    assert client.send("points.earned", id="evt_1").get_json() == {"received": True}
    assert calls == [("points.earned", "evt_1"), ("points.earned", "evt_1")]


def test_400_event_older_than_max_age(
    calls: list[tuple[str, str]], webhooks: PlointsWebhooks
) -> None:
    app, _ = build_app({"PLOINTS_MAX_EVENT_AGE": 86400}, webhooks)
    client = PlointsClient(app)
    old = client.send("points.earned", id="evt_old", timestamp="2020-01-01T00:00:00Z")
    assert old.status_code == 400
    assert old.get_json() == {"error": "event is older than PLOINTS_MAX_EVENT_AGE (86400 s)"}
    assert client.send("points.earned", id="evt_new").status_code == 200
    assert calls == [("points.earned", "evt_new")]


def test_logs_outcome_without_secret_or_body(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="flask_ploints")
    client = PlointsClient(app)
    client.send("points.earned", {"note": "private"}, id="evt_1")
    client.post(b'{"note": "forged"}', signature="f" * 64)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "event 'evt_1' ('points.earned') processed",
        "rejected a delivery: invalid signature",
    ]
    assert SECRET not in caplog.text
    assert "private" not in caplog.text
    assert "forged" not in caplog.text


@pytest.fixture
def make_https_app() -> Flask:
    return build_app({"PLOINTS_REQUIRE_HTTPS": True})[0]
