"""The ``flask ploints`` commands, through ``app.test_cli_runner()``; the
Ploints API is a local HTTP server answering in the documented shape.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask
from flask.cli import ScriptInfo
from werkzeug.serving import make_server

from flask_ploints import EVENT_TYPES
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import on
from flask_ploints._cli import ploints
from flask_ploints._signature import sign
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import InspectableStore
from flask_ploints.stores import RedisStore
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.testing import FakeClock
from flask_ploints.testing import build_event

from .support import SECRET
from .support import build_app


def run(app: Flask, *args: str, input: str | bytes | None = None) -> Result:
    return app.test_cli_runner().invoke(ploints, list(args), input=input)


def assert_one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {message}\n"


def test_send_delivers_a_signed_sample_in_process(app: Flask, calls: list[tuple[str, str]]) -> None:
    result = run(app, "send", "points.earned", "--id", "evt_cli")
    assert result.exit_code == 0
    assert result.output == '200 {"received": true}\n'
    assert calls == [("points.earned", "evt_cli")]


def test_send_uses_data_and_data_file(
    webhooks: PlointsWebhooks, app: Flask, tmp_path: Path
) -> None:
    seen: list[dict[str, t.Any]] = []
    webhooks.on("badge.issued")(lambda event: seen.append(dict(event.data)))
    assert run(app, "send", "badge.issued", "--data", '{"badge": "Gold"}').exit_code == 0
    path = tmp_path / "data.json"
    path.write_text('{"badge": "Silver"}')
    assert run(app, "send", "badge.issued", "--data-file", str(path)).exit_code == 0
    assert seen == [{"badge": "Gold"}, {"badge": "Silver"}]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["send", "points.earnd"],
            "unknown event type 'points.earnd'; known: points.earned, points.redeemed, customer.created, customer.tier_changed, badge.issued, reward.redeemed, campaign.conversion",
        ),
        (
            ["send", "points.earned", "--data", "{oops"],
            "--data is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (["send", "points.earned", "--data", "[1]"], "--data must be a JSON object"),
        (
            ["send", "points.earned", "--name", "other"],
            "PlointsWebhooks 'other' is not registered on app 'ploints_test' (registered: ploints); did you forget to call init_app(app)?",
        ),
        (
            ["simulate", "nope.nope"],
            "unknown event type 'nope.nope'; known: points.earned, points.redeemed, customer.created, customer.tier_changed, badge.issued, reward.redeemed, campaign.conversion",
        ),
        (["simulate", "points.earned", "--data", "[1]"], "--data must be a JSON object"),
        (
            ["purge"],
            "MemoryStore has nothing to purge: its entries expire by themselves, or it keeps none",
        ),
        (
            ["send", "points.earned", "--url", "file:///etc/passwd"],
            "--url must be an http:// or https:// URL, not 'file:///etc/passwd'",
        ),
        (
            ["send", "points.earned", "--url", "localhost:5000/webhooks/ploints"],
            "--url must be an http:// or https:// URL, not 'localhost:5000/webhooks/ploints'",
        ),
        (
            ["send", "points.earned", "--url", "http://[::1/webhooks"],
            "--url: not a valid URL (Invalid IPv6 URL)",
        ),
        (
            ["send", "points.earned", "--url", "http://127.0.0.1:99999/"],
            "--url: not a valid URL (Port out of range 0-65535)",
        ),
        (
            ["send", "points.earned", "--data", '{"a": ' + "[" * 40 + "]" * 40 + "}"],
            "not a valid event: JSON nested deeper than 32 levels",
        ),
        (
            ["send", "points.earned", "--data", '{"amount": NaN}'],
            "not a valid event: NaN is not valid JSON",
        ),
        (
            ["send", "points.earned", "--id", "evt\n1"],
            "not a valid event: field 'id' holds a control character or a lone surrogate",
        ),
        (
            ["simulate", "points.earned", "--speed", "nan"],
            "--speed must be a finite number, not nan",
        ),
        (
            ["simulate", "points.earned", "--speed", "inf"],
            "--speed must be a finite number, not inf",
        ),
    ],
)
def test_misuse_is_a_one_line_error(app: Flask, args: list[str], message: str) -> None:
    assert_one_line_error(run(app, *args), message)


def test_data_nested_past_the_interpreter_is_a_one_line_error(app: Flask) -> None:
    result = run(app, "send", "points.earned", "--data", "[" * 100_000)
    assert result.exit_code == 1
    assert result.output.startswith("Error: --data is not valid JSON: maximum recursion depth")
    assert result.output.count("\n") == 1


def test_data_file_that_is_not_utf8_is_a_one_line_error(app: Flask, tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'{"badge": "\xff\xfe"}')
    assert_one_line_error(
        run(app, "send", "badge.issued", "--data-file", str(path)), "--data-file is not UTF-8"
    )


def test_send_with_both_data_options_is_refused(app: Flask, tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text("{}")
    result = run(app, "send", "points.earned", "--data", "{}", "--data-file", str(path))
    assert_one_line_error(result, "give --data or --data-file, not both")


def test_send_reports_a_failing_handler_and_exits_non_zero(
    webhooks: PlointsWebhooks, app: Flask
) -> None:
    @webhooks.on("points.earned")
    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    result = run(app, "send", "points.earned", "--id", "evt_1")
    assert result.exit_code == 1
    assert result.output == (
        '500 {"error": "handler failed"}'
        " (event 'evt_1' ('points.earned') failed: a handler raised RuntimeError('boom'))\n"
    )


@pytest.fixture
def served(app: Flask) -> t.Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}/webhooks/ploints"
    server.shutdown()
    thread.join(5)


def test_send_over_http(app: Flask, served: str, calls: list[tuple[str, str]]) -> None:
    result = run(app, "send", "customer.created", "--id", "evt_http", "--url", served)
    assert result.output == '200 {"received": true}\n'
    assert calls == [("customer.created", "evt_http")]


def test_send_to_an_unreachable_url(app: Flask) -> None:
    result = run(app, "send", "points.earned", "--url", "http://127.0.0.1:1/webhooks/ploints")
    assert_one_line_error(
        result, "cannot reach http://127.0.0.1:1/webhooks/ploints: [Errno 111] Connection refused"
    )


def test_sign_reads_a_file_or_stdin(app: Flask, tmp_path: Path) -> None:
    body = b'{"id": "evt_1"}'
    path = tmp_path / "body.json"
    path.write_bytes(body)
    assert run(app, "sign", str(path)).output == sign(body, SECRET) + "\n"
    assert run(app, "sign", input=body).output == sign(body, SECRET) + "\n"
    assert run(app, "sign", "-", input=body).output == sign(body, SECRET) + "\n"


def test_sign_missing_file(app: Flask) -> None:
    result = run(app, "sign", "/no/such/file")
    assert result.exit_code == 2
    assert "No such file or directory" in result.output


def award(event: Event) -> None:
    pass


def audit(event: Event) -> None:
    pass


def test_events_lists_handlers(
    webhooks: PlointsWebhooks, app: Flask, restore_signals: None
) -> None:
    webhooks.on("points.earned", "points.redeemed")(award)
    webhooks.on_any(audit)
    on("points.earned")(audit)
    lines = run(app, "events").output.splitlines()
    assert lines[0] == "points.earned          tests.test_cli.award, tests.test_cli.audit (signal)"
    assert lines[1] == "points.redeemed        tests.test_cli.award"
    assert [line.split()[0] for line in lines] == [*EVENT_TYPES, "(every"]
    assert lines[-1] == "(every event)          tests.test_cli.audit"


def test_simulate_retries_lost_answers_and_dedupe_holds(
    app: Flask, calls: list[tuple[str, str]]
) -> None:
    result = run(
        app,
        "simulate",
        "points.earned",
        "--id",
        "evt_sim",
        "--speed",
        "1000000",
        "--fail-first",
        "2",
    )
    assert result.exit_code == 0
    assert result.output == (
        'attempt 1 (sender\'s +0 s): 200 {"received": true} (answer lost: the sender retries)\n'
        'attempt 2 (sender\'s +60 s): 200 {"received": true, "duplicate": true} (answer lost: the sender retries)\n'
        'attempt 3 (sender\'s +300 s): 200 {"received": true, "duplicate": true}\n'
    )
    assert calls == [("points.earned", "evt_sim")]


def test_simulate_delivers_the_given_data(webhooks: PlointsWebhooks, app: Flask) -> None:
    seen: list[dict[str, t.Any]] = []

    @webhooks.on("customer.created")
    def created(event: Event) -> None:
        seen.append(dict(event.data))

    data = '{"customerEmail": "lee@example.com", "name": "Lee Chan"}'
    result = run(app, "simulate", "customer.created", "--data", data, "--speed", "1000000")
    assert result.exit_code == 0
    assert result.output == 'attempt 1 (sender\'s +0 s): 200 {"received": true}\n'
    assert seen == [{"customerEmail": "lee@example.com", "name": "Lee Chan"}]


def test_simulate_gives_up_after_the_last_retry(webhooks: PlointsWebhooks, app: Flask) -> None:
    attempts: list[str] = []

    @webhooks.on("points.earned")
    def broken(event: Event) -> None:
        attempts.append(event.id)
        raise RuntimeError("down")

    started = time.perf_counter()
    result = run(app, "simulate", "points.earned", "--speed", "1000000")
    assert time.perf_counter() - started < 5
    assert result.exit_code == 1
    assert result.output.count('500 {"error": "handler failed"}') == 6
    assert result.output.endswith(
        "Error: the sender gave up after 6 attempts; the event is marked failed\n"
    )
    assert len(attempts) == 6


# failed, replay and purge, on stores that keep failed events.

#: When the Redis store's clock starts: 2025-06-15 15:06:40 UTC.
START = 1_750_000_000.0
#: A time as ``failed`` prints it, from a store without a clock of ours.
WHEN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ"


class Kept(t.NamedTuple):
    """A store that keeps failed events, and the clock of its times when it
    takes one.
    """

    store: InspectableStore
    clock: FakeClock | None


@pytest.fixture(params=["sqlite", "redis"])
def kept(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> t.Iterator[Kept]:
    if request.param == "sqlite":
        sql = SQLAlchemyStore.from_url("sqlite:///" + str(tmp_path / "x.db"))
        yield Kept(sql, None)
        sql.close()
        sql.engine.dispose()
        return
    redis_url: str = request.getfixturevalue("redis_url")
    clock = FakeClock(START)
    store = RedisStore.from_url(redis_url, prefix=f"{unique}:", clock=clock)
    yield Kept(store, clock)
    keys = list(store.client.scan_iter(match=f"{unique}:*", count=500))
    if keys:
        store.client.delete(*keys)
    store.client.close()


@pytest.fixture
def broken(webhooks: PlointsWebhooks) -> dict[str, bool]:
    """Makes every handler of ``webhooks`` raise while ``["on"]`` is true."""
    state = {"on": True}

    @webhooks.on_any
    def breaks(event: Event) -> None:
        if state["on"]:
            raise RuntimeError(f"still broken on {event.id}")

    return state


@pytest.fixture
def kept_app(
    kept: Kept, webhooks: PlointsWebhooks, calls: list[tuple[str, str]], broken: dict[str, bool]
) -> Flask:
    # calls records an event before broken raises: every run is in calls.
    return build_app({"PLOINTS_DEDUPE_STORE": kept.store}, webhooks)[0]


def _failed(store: InspectableStore, event_id: str, *errors: str) -> None:
    """Leave ``event_id`` failed in ``store`` after one claim per error, as a
    worker that gave up does.
    """
    body = json.dumps(build_event("points.earned", id=event_id)).encode()
    for error in errors:
        claim = store.claim(event_id, 60, body)
        assert claim.status is ClaimStatus.CLAIMED
        assert store.fail(event_id, claim.token, error, 3600) is True


def _traceback(last: str) -> str:
    return f'Traceback (most recent call last):\n  File "app.py", line 1, in award\n{last}\n'


def test_failed_with_nothing_failed(kept: Kept, kept_app: Flask) -> None:
    done = kept.store.claim("evt_done", 60)
    kept.store.commit("evt_done", done.token, 3600)
    result = run(kept_app, "failed")
    assert (result.exit_code, result.output) == (0, "no failed events\n")


def test_failed_lists_the_newest_first(kept: Kept, kept_app: Flask) -> None:
    _failed(kept.store, "evt_1", _traceback("RuntimeError: boom"))
    if kept.clock is not None:
        kept.clock.advance(60)
    _failed(kept.store, "evt_2", _traceback("ValueError: bad amount"))
    if kept.clock is not None:
        kept.clock.advance(60)
    _failed(kept.store, "evt_1", _traceback("RuntimeError: boom"), "KeyError: 'x'\n\n")
    done = kept.store.claim("evt_done", 60)
    kept.store.commit("evt_done", done.token, 3600)

    result = run(kept_app, "failed")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    if kept.clock is not None:
        assert lines == [
            "evt_1  2025-06-15 15:08:40Z  attempts=3  KeyError: 'x'",
            "evt_2  2025-06-15 15:07:40Z  attempts=1  ValueError: bad amount",
        ]
    else:
        assert len(lines) == 2
        assert re.fullmatch(rf"evt_1  {WHEN}  attempts=3  KeyError: 'x'", lines[0])
        assert re.fullmatch(rf"evt_2  {WHEN}  attempts=1  ValueError: bad amount", lines[1])

    result = run(kept_app, "failed", "--limit", "1")
    assert (result.exit_code, result.output.splitlines()) == (0, lines[:1])


def test_failed_needs_a_store_that_keeps_them() -> None:
    app = build_app({"PLOINTS_DEDUPE_STORE": None})[0]
    assert_one_line_error(
        run(app, "failed"),
        "NullStore does not keep failed events; use SQLAlchemyStore or RedisStore",
    )


def test_replay_runs_a_failed_event_again(
    kept: Kept, kept_app: Flask, calls: list[tuple[str, str]], broken: dict[str, bool]
) -> None:
    _failed(kept.store, "evt_1", "RuntimeError: first failure")

    result = run(kept_app, "replay", "evt_1")
    # Failed again: said, and a non-zero status for scripts.
    assert (result.exit_code, result.output) == (
        1,
        "evt_1: failed (event 'evt_1' ('points.earned') failed: a handler raised"
        " RuntimeError('still broken on evt_1'))\n",
    )
    assert calls == [("points.earned", "evt_1")]
    stored = kept.store.get("evt_1")
    assert stored is not None
    assert (stored.status, stored.attempts) == ("failed", 2)
    assert stored.error is not None
    assert stored.error.endswith("RuntimeError: still broken on evt_1\n")

    broken["on"] = False
    result = run(kept_app, "replay", "evt_1")
    assert (result.exit_code, result.output) == (0, "evt_1: processed\n")
    assert calls == [("points.earned", "evt_1")] * 2
    stored = kept.store.get("evt_1")
    assert stored is not None
    assert (stored.status, stored.attempts) == ("done", 3)

    assert_one_line_error(run(kept_app, "replay", "evt_1"), "event 'evt_1' is done, not failed")
    assert calls == [("points.earned", "evt_1")] * 2


def test_replay_of_an_unknown_id(kept_app: Flask, calls: list[tuple[str, str]]) -> None:
    result = run(kept_app, "replay", "evt_nope")
    assert_one_line_error(result, "event 'evt_nope' is not in the dedupe store")
    assert calls == []


def test_replay_of_an_event_in_flight(
    kept: Kept, kept_app: Flask, calls: list[tuple[str, str]]
) -> None:
    kept.store.claim("evt_1", 60, b"{}")
    result = run(kept_app, "replay", "evt_1")
    assert_one_line_error(result, "event 'evt_1' is in_flight, not failed")
    assert calls == []


def test_replay_with_the_store_down() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        app = build_app({"PLOINTS_DEDUPE_STORE": store})[0]
        result = run(app, "replay", "evt_1")
    finally:
        store.client.close()
    assert_one_line_error(result, "the dedupe store is unavailable; try again later")


@pytest.mark.parametrize("command", ["failed", "purge"])
def test_failed_and_purge_with_the_store_down(command: str) -> None:
    # A PostgreSQL store behind a port nothing listens on.
    store = SQLAlchemyStore.from_url("postgresql://postgres@127.0.0.1:1/test", timeout=0.5)
    try:
        app = build_app({"PLOINTS_DEDUPE_STORE": store})[0]
        result = run(app, command)
    finally:
        store.engine.dispose()
    assert_one_line_error(result, "the dedupe store is unavailable; try again later")


def test_purge_deletes_the_expired_rows(tmp_path: Path) -> None:
    store = SQLAlchemyStore.from_url("sqlite:///" + str(tmp_path / "x.db"))
    try:
        app = build_app({"PLOINTS_DEDUPE_STORE": store})[0]
        # A retention of 0 expires a row as it is written: purge, later,
        # finds it past.
        for event_id in ("evt_old_1", "evt_old_2"):
            claim = store.claim(event_id, 60)
            assert store.commit(event_id, claim.token, 0) is True
        claim = store.claim("evt_old_failed", 60)
        assert store.fail("evt_old_failed", claim.token, "boom", 0) is True
        claim = store.claim("evt_kept", 60)
        assert store.commit("evt_kept", claim.token, 3600) is True
        store.claim("evt_in_flight", 60)

        def ids() -> list[str]:
            with store.engine.connect() as connection:
                rows = connection.execute(sa.select(store.table.c.id).order_by(store.table.c.id))
                return [row.id for row in rows]

        assert len(ids()) == 5
        result = run(app, "purge")
        assert (result.exit_code, result.output) == (0, "purged 3 expired event(s)\n")
        assert ids() == ["evt_in_flight", "evt_kept"]
        result = run(app, "purge")
        assert (result.exit_code, result.output) == (0, "purged 0 expired event(s)\n")
    finally:
        store.close()
        store.engine.dispose()


def test_purge_of_a_store_that_expires_by_itself(kept: Kept, kept_app: Flask) -> None:
    if isinstance(kept.store, SQLAlchemyStore):
        result = run(kept_app, "purge")
        assert (result.exit_code, result.output) == (0, "purged 0 expired event(s)\n")
        return
    assert_one_line_error(
        run(kept_app, "purge"),
        "RedisStore has nothing to purge: its entries expire by themselves, or it keeps none",
    )


class PlointsAPI(BaseHTTPRequestHandler):
    """Answers POST /api/v1/webhooks as the documented API does."""

    requests: t.ClassVar[list[dict[str, t.Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        PlointsAPI.requests.append(
            {"path": self.path, "auth": self.headers["Authorization"], "body": body}
        )
        if self.headers["Authorization"] == "Bearer slow":
            time.sleep(2)
        odd = ODD_ANSWERS.get(self.headers["Authorization"])
        if odd is not None:
            self._answer(*odd)
            return
        if self.headers["Authorization"] != "Bearer key_good":
            self._answer(401, {"success": False, "error": "Invalid API key"})
            return
        data = {
            "id": "wh_abc123",
            "url": body["url"],
            "events": body["events"],
            "secret": "whsec_k8x2new",
        }
        self._answer(200, {"success": True, "data": data})

    def _answer(self, status: int, payload: t.Any, location: str | None = None) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: t.Any) -> None:
        pass


#: Answers the fake API gives for some keys, as (status, payload[, location]).
ODD_ANSWERS: dict[str, tuple[t.Any, ...]] = {
    "Bearer garbage": (200, b"<html>not json</html>"),
    "Bearer deep": (200, b"[" * 100_000),
    "Bearer nested": (200, {"success": True, "data": {"id": {"x": 1}, "secret": ["whsec_a"]}}),
    "Bearer no_data": (200, {"success": True, "data": "wh_1"}),
    "Bearer newline": (200, {"data": {"id": "wh_1", "secret": "whsec_a\nforged line"}}),
    "Bearer events_text": (
        200,
        {"data": {"id": "wh_1", "secret": "whsec_a", "events": "points.earned"}},
    ),
    "Bearer url_number": (200, {"data": {"id": "wh_1", "secret": "whsec_a", "url": 7}}),
}


@pytest.fixture
def api() -> t.Iterator[str]:
    PlointsAPI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), PlointsAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _api_app(api: str, key: str | None) -> Flask:
    config: dict[str, t.Any] = {"PLOINTS_API_URL": api}
    if key is not None:
        config["PLOINTS_API_KEY"] = key
    return build_app(config)[0]


def test_register_creates_the_webhook_and_prints_the_secret_once(api: str) -> None:
    app = _api_app(api, "key_good")
    result = run(
        app,
        "register",
        "--url",
        "https://shop.example/webhooks/ploints",
        "--events",
        "points.earned,customer.created",
    )
    assert result.exit_code == 0
    assert result.output.splitlines()[:3] == [
        "webhook wh_abc123 created for https://shop.example/webhooks/ploints",
        "events: points.earned, customer.created",
        "secret: whsec_k8x2new",
    ]
    assert "PLOINTS_WEBHOOK_SECRET" in result.output
    assert PlointsAPI.requests == [
        {
            "path": "/api/v1/webhooks",
            "auth": "Bearer key_good",
            "body": {
                "url": "https://shop.example/webhooks/ploints",
                "events": ["points.earned", "customer.created"],
            },
        }
    ]


def test_register_with_a_bad_key(api: str) -> None:
    result = run(
        _api_app(api, "key_bad"),
        "register",
        "--url",
        "https://x.example/h",
        "--events",
        "badge.issued",
    )
    assert_one_line_error(result, "Ploints answered 401: the API key was refused")


def test_register_times_out(api: str) -> None:
    result = run(
        _api_app(api, "slow"),
        "register",
        "--url",
        "https://x.example/h",
        "--events",
        "badge.issued",
        "--timeout",
        "0.5",
    )
    assert_one_line_error(result, f"cannot reach {api}: timed out")


def test_register_without_an_api_key(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLOINTS_API_KEY", raising=False)
    result = run(
        _api_app(api, None), "register", "--url", "https://x.example/h", "--events", "badge.issued"
    )
    assert_one_line_error(result, "PLOINTS_API_KEY is not set (config or environment)")
    assert PlointsAPI.requests == []


def test_register_with_unknown_events(api: str) -> None:
    result = run(
        _api_app(api, "key_good"),
        "register",
        "--url",
        "https://x.example/h",
        "--events",
        "points.earned,nope",
    )
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: --events: unknown event type(s) nope; known: points.earned"
    )
    assert PlointsAPI.requests == []


def test_register_with_an_unreachable_api() -> None:
    result = run(
        _api_app("http://127.0.0.1:1/api/v1", "key_good"),
        "register",
        "--url",
        "https://x.example/h",
        "--events",
        "badge.issued",
    )
    assert_one_line_error(
        result, "cannot reach http://127.0.0.1:1/api/v1: [Errno 111] Connection refused"
    )


def test_the_group_is_registered_through_the_entry_point(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(
        "from flask import Flask\n"
        "from flask_ploints import PlointsWebhooks\n"
        "app = Flask('cliapp')\n"
        "app.testing = True\n"
        "app.config['PLOINTS_WEBHOOK_SECRET'] = 'whsec_cli'\n"
        "PlointsWebhooks(app)\n"
    )
    flask = Path(sys.executable).with_name("flask")
    result = subprocess.run(
        [str(flask), "--app", "cliapp", "ploints", "send", "points.earned", "--id", "evt_ep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == '200 {"received": true}\n'


@pytest.mark.parametrize(
    "key, message",
    [
        ("garbage", "Ploints answered with something that is not JSON"),
        ("deep", "Ploints answered with something that is not JSON"),
        ("nested", "Ploints answered without a webhook id and secret"),
        ("no_data", "Ploints answered without a webhook id and secret"),
        ("newline", "Ploints answered without a webhook id and secret"),
        ("events_text", "Ploints answered with webhook events that are not strings"),
        ("url_number", "Ploints answered with a webhook url that is not a string"),
    ],
)
def test_register_refuses_answers_of_another_shape(api: str, key: str, message: str) -> None:
    result = run(
        _api_app(api, key), "register", "--url", "https://x.example/h", "--events", "badge.issued"
    )
    assert_one_line_error(result, message)


@pytest.mark.parametrize(
    "url",
    ["http://api.ploints.example/api/v1", "http://10.0.0.1/api/v1", "ftp://127.0.0.1/api/v1"],
)
def test_register_sends_the_key_over_https_only(url: str) -> None:
    result = run(
        _api_app(url, "key_good"),
        "register",
        "--url",
        "https://x.example/h",
        "--events",
        "badge.issued",
    )
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: PLOINTS_API_URL must ")


class _Elsewhere(BaseHTTPRequestHandler):
    """Another origin, recording the Authorization headers it is sent."""

    seen: t.ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        _Elsewhere.seen.append(self.headers["Authorization"])
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: t.Any) -> None:
        pass


def test_register_follows_no_redirect_and_never_sends_the_key_elsewhere(api: str) -> None:
    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), _Elsewhere)
    thread = threading.Thread(target=elsewhere.serve_forever, daemon=True)
    thread.start()
    _Elsewhere.seen = []
    try:
        target = f"http://127.0.0.1:{elsewhere.server_address[1]}/steal"
        ODD_ANSWERS["Bearer redirect"] = (307, {}, target)
        result = run(
            _api_app(api, "redirect"),
            "register",
            "--url",
            "https://x.example/h",
            "--events",
            "badge.issued",
        )
    finally:
        ODD_ANSWERS.pop("Bearer redirect", None)
        elsewhere.shutdown()
        elsewhere.server_close()
        thread.join(5)
    assert_one_line_error(
        result,
        "Ploints answered 307: a redirect, not followed: the API key goes to PLOINTS_API_URL only",
    )
    assert _Elsewhere.seen == []


def test_failed_lists_this_instances_events_only(tmp_path: Path) -> None:
    main = PlointsWebhooks()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": f"sqlite:///{tmp_path / 'shared.db'}"}, main)
    PlointsWebhooks(app, name="partner", url="/partner", secret="whsec_partner")
    store = app.extensions["ploints"]["ploints"].store
    for key in ("evt_main", "partner\x1fevt_partner"):
        claim = store.claim(key, 60)
        store.fail(key, claim.token, "RuntimeError: boom", 3600)

    main_lines = run(app, "failed").output.splitlines()
    partner_lines = run(app, "failed", "--name", "partner").output.splitlines()
    assert [line.split()[0] for line in main_lines] == ["evt_main"]
    assert [line.split()[0] for line in partner_lines] == ["evt_partner"]


def _accounts_api_app(api: str) -> Flask:
    return build_app(
        {
            "PLOINTS_API_URL": api,
            "PLOINTS_API_KEY": "key_good",
            "PLOINTS_WEBHOOK_URL": "/webhooks/ploints/<account>",
            "PLOINTS_WEBHOOK_SECRET": {"m1": "whsec_m1"}.get,
        }
    )[0]


@pytest.mark.parametrize(
    ("url", "account", "registered"),
    [
        (
            "https://shop.example/webhooks/ploints/<account>",
            "m 2",
            "https://shop.example/webhooks/ploints/m%202",
        ),
        (
            "https://shop.example/webhooks/ploints/m1",
            "m1",
            "https://shop.example/webhooks/ploints/m1",
        ),
    ],
)
def test_register_for_an_account(api: str, url: str, account: str, registered: str) -> None:
    app = _accounts_api_app(api)
    result = run(app, "register", "--url", url, "--events", "points.earned", "--account", account)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"webhook wh_abc123 created for {registered}",
        "events: points.earned",
        "secret: whsec_k8x2new",
        "Store the secret now, it is not shown again: your PLOINTS_WEBHOOK_SECRET lookup must"
        f" return it for account {account!r} (keep it in your database or secret manager).",
    ]
    assert [request["body"]["url"] for request in PlointsAPI.requests] == [registered]


def test_register_for_an_account_checks_the_url_and_the_endpoint(api: str) -> None:
    app = _accounts_api_app(api)
    assert_one_line_error(
        run(
            app,
            "register",
            "--url",
            "https://shop.example/hooks/m1",
            "--events",
            "points.earned",
            "--account",
            "m1",
        ),
        "--url 'https://shop.example/hooks/m1' is not the endpoint's URL for account 'm1': its"
        " path must end with '/webhooks/ploints/m1' (or put <account> in --url)",
    )
    single = _api_app(api, "key_good")
    assert_one_line_error(
        run(
            single,
            "register",
            "--url",
            "https://shop.example/webhooks/ploints",
            "--events",
            "points.earned",
            "--account",
            "m1",
        ),
        "--account: PlointsWebhooks 'ploints' serves one account: its URL '/webhooks/ploints'"
        " has no <account>",
    )
    assert PlointsAPI.requests == []


# A store that is down, an app that cannot start: one line each, and a
# non-zero status.

#: A Redis store behind a port nothing listens on.
REDIS_DOWN = "redis://127.0.0.1:1/0"
_REDIS_REFUSED = (
    " (event 'evt_1' ('points.earned') not claimed: the dedupe store failed: StoreError:"
    " Redis: Error 111 connecting to 127.0.0.1:1. Connection refused.)"
)
_UNAVAILABLE = '503 {"error": "dedupe store unavailable"}'


def test_send_with_the_store_down_is_one_line() -> None:
    app = build_app({"PLOINTS_DEDUPE_STORE": REDIS_DOWN})[0]
    result = run(app, "send", "points.earned", "--id", "evt_1")
    assert (result.exit_code, result.output) == (1, f"{_UNAVAILABLE}{_REDIS_REFUSED}\n")


def test_simulate_with_the_store_down_is_one_line_per_delivery() -> None:
    app = build_app({"PLOINTS_DEDUPE_STORE": REDIS_DOWN})[0]
    result = run(app, "simulate", "points.earned", "--id", "evt_1", "--speed", "1000000")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"attempt {attempt} (sender's +{delay} s): {_UNAVAILABLE}{_REDIS_REFUSED}"
        for attempt, delay in enumerate([0, 60, 300, 1800, 7200, 43200], start=1)
    ] + ["Error: the sender gave up after 6 attempts; the event is marked failed"]


def _no_secret() -> Flask:
    app = Flask("no_secret")
    app.testing = True
    PlointsWebhooks(app)
    return app


_NO_SECRET = (
    "PLOINTS_WEBHOOK_SECRET is not set: set it to the secret Ploints gave for this endpoint"
)


@pytest.mark.parametrize(
    "args",
    [
        ["send", "points.earned"],
        ["simulate", "points.earned"],
        ["sign", "-"],
        ["events"],
        ["failed"],
        ["replay", "evt_1"],
        ["purge"],
        ["register", "--url", "https://example.com/hook", "--events", "points.earned"],
    ],
    ids=lambda args: args[0] if isinstance(args, list) else None,
)
def test_an_app_that_cannot_start_is_a_one_line_error(args: list[str]) -> None:
    runner = Flask("runner").test_cli_runner()
    result = runner.invoke(ploints, args, obj=ScriptInfo(create_app=_no_secret), input="")
    assert_one_line_error(result, _NO_SECRET)


_CLI_APPS = {
    "nosecret": "app = Flask('nosecret')\nPlointsWebhooks(app)\n",
    "storedown": (
        "app = Flask('storedown')\n"
        "app.config['PLOINTS_WEBHOOK_SECRET'] = 'whsec_cli'\n"
        f"app.config['PLOINTS_DEDUPE_STORE'] = {REDIS_DOWN!r}\n"
        "PlointsWebhooks(app)\n"
    ),
}


@pytest.mark.parametrize(
    "app_name, args, stdout, stderr",
    [
        ("nosecret", ["send", "points.earned"], "", f"Error: {_NO_SECRET}\n"),
        ("nosecret", ["events"], "", f"Error: {_NO_SECRET}\n"),
        (
            "storedown",
            ["send", "points.earned", "--id", "evt_1"],
            f"{_UNAVAILABLE}{_REDIS_REFUSED}\n",
            "",
        ),
        (
            "storedown",
            ["replay", "evt_1"],
            "",
            "Error: the dedupe store is unavailable; try again later\n",
        ),
    ],
    ids=["send-no-secret", "events-no-secret", "send-store-down", "replay-store-down"],
)
def test_misuse_under_a_real_flask_command(
    tmp_path: Path, app_name: str, args: list[str], stdout: str, stderr: str
) -> None:
    (tmp_path / f"{app_name}.py").write_text(
        "from flask import Flask\nfrom flask_ploints import PlointsWebhooks\n" + _CLI_APPS[app_name]
    )
    flask = Path(sys.executable).with_name("flask")
    result = subprocess.run(
        [str(flask), "--app", app_name, "ploints", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Python's last-resort handler would print each log record's traceback.
    assert (result.returncode, result.stdout, result.stderr) == (1, stdout, stderr)
