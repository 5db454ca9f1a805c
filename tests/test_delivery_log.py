"""The delivery log and its page: a row per outcome, rejected requests
without their body, filters, detail, access check, CSRF, and re-running a
failed event; on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import re
import subprocess
import sys
import time
import typing as t
from datetime import UTC
from datetime import datetime
from pathlib import Path

import flask
import flask_login
import hypothesis
import hypothesis.strategies
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from flask_ploints import ConfigError
from flask_ploints import DeliveryLogError
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import StoreError
from flask_ploints._events import parse_event
from flask_ploints.delivery_log import Delivery
from flask_ploints.delivery_log import DeliveryLog
from flask_ploints.delivery_log import delivery_log
from flask_ploints.delivery_log._state import EXTENSION_KEY
from flask_ploints.delivery_log._table import OUTCOMES
from flask_ploints.delivery_log._table import make_table
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .support import build_app

PAGE = "/ploints/deliveries"


class Shop:
    """An app with the log on, a handler that fails while ``broken``, and
    an access check the test can switch.
    """

    def __init__(self, log: DeliveryLog, **config: t.Any) -> None:
        self.broken = False
        self.allowed = True
        self.access_calls = 0
        self.handled: list[str] = []

        def access() -> bool:
            self.access_calls += 1
            return self.allowed

        self.app, self.webhooks = build_app(
            {
                "SECRET_KEY": "test-secret-key",
                "PLOINTS_DELIVERY_LOG": log,
                "PLOINTS_DELIVERY_LOG_ACCESS": access,
                **config,
            }
        )
        self.log = log

        @self.webhooks.on("points.earned", "customer.created")
        def handle(event: Event) -> None:
            if self.broken:
                raise RuntimeError(f"boom on {event.id}")
            self.handled.append(event.id)

        self.sender = PlointsClient(self.app)
        self.browser: FlaskClient = self.app.test_client()

    def csrf_token(self, delivery_id: int) -> str:
        page = self.browser.get(f"{PAGE}/{delivery_id}").get_data(as_text=True)
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match is not None, page
        return match.group(1)

    def rerun(self, delivery_id: int, token: str | None = None) -> t.Any:
        form = {} if token is None else {"csrf_token": token}
        return self.browser.post(f"{PAGE}/{delivery_id}/rerun", data=form)


def _drop(log: DeliveryLog) -> None:
    try:
        log.table.drop(log.engine, checkfirst=True)
    finally:
        log.engine.dispose()


@pytest.fixture
def sqlite_log(tmp_path: Path, unique: str) -> t.Iterator[DeliveryLog]:
    log = DeliveryLog.from_url(f"sqlite:///{tmp_path / 'log.db'}", table_name=unique)
    yield log
    _drop(log)


@pytest.fixture
def postgres_log(postgres_url: str, unique: str) -> t.Iterator[DeliveryLog]:
    log = DeliveryLog.from_url(postgres_url, table_name=unique)
    yield log
    _drop(log)


@pytest.fixture
def mariadb_log(mariadb_url: str, unique: str) -> t.Iterator[DeliveryLog]:
    log = DeliveryLog.from_url(mariadb_url, table_name=unique)
    yield log
    _drop(log)


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def any_log(request: pytest.FixtureRequest) -> DeliveryLog:
    log: DeliveryLog = request.getfixturevalue(f"{request.param}_log")
    return log


@pytest.fixture
def shop(sqlite_log: DeliveryLog) -> Shop:
    return Shop(sqlite_log)


def _deliver_one_of_each(shop: Shop) -> None:
    """processed, duplicate, failed, forged (401), signed garbage (400)."""
    assert shop.sender.send("points.earned", id="evt_ok").status_code == 200
    assert shop.sender.send("points.earned", id="evt_ok").get_json()["duplicate"] is True
    shop.broken = True
    assert shop.sender.send("customer.created", id="evt_bad").status_code == 500
    shop.broken = False
    forged = json.dumps(build_event("points.earned", id="evt_forged")).encode()
    assert shop.sender.post(forged, signature="0" * 64).status_code == 401
    assert shop.sender.post(b'["signed", "but not an event"]').status_code == 400


def _summary(rows: list[Delivery]) -> list[tuple[str | None, str | None, str, str | None]]:
    return [(row.event_id, row.event_type, row.outcome, row.reason) for row in rows]


def test_a_body_near_the_size_limit_is_kept_whole(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    # Under PLOINTS_WEBHOOK_MAX_BYTES's default; MySQL's BLOB would hold 64 KiB.
    data = {"description": "x" * (1000 * 1000)}
    assert shop.sender.send("points.earned", data, id="evt_big").status_code == 200
    (row,) = any_log.recent(event_id="evt_big")
    assert row.payload is not None and json.loads(row.payload)["data"] == data


def test_every_outcome_is_recorded(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    before = time.time()
    _deliver_one_of_each(shop)
    rows = any_log.recent()
    assert _summary(rows) == [
        (None, None, "rejected", "body is not a JSON object"),
        (None, None, "rejected", "invalid signature"),
        ("evt_bad", "customer.created", "failed", "RuntimeError: boom on evt_bad"),
        ("evt_ok", "points.earned", "duplicate", None),
        ("evt_ok", "points.earned", "processed", None),
    ]
    rejected_signed, forged, failed, duplicate, processed = rows
    # The bodies of rejected requests are unverified: never stored.
    for row in (rejected_signed, forged):
        assert (row.payload, row.traceback, row.duration) == (None, None, None)
    assert json.loads(processed.payload or b"")["id"] == "evt_ok"
    assert json.loads(failed.payload or b"")["type"] == "customer.created"
    assert failed.traceback is not None
    assert failed.traceback.startswith("Traceback (most recent call last):")
    assert "in handle" in failed.traceback
    assert failed.traceback.rstrip().endswith("RuntimeError: boom on evt_bad")
    assert failed.duration is not None and processed.duration is not None
    assert duplicate.duration is None
    assert all(row.name == "ploints" for row in rows)
    assert all(before - 1 <= row.received_at <= time.time() for row in rows)
    assert [row.id for row in rows] == sorted((row.id for row in rows), reverse=True)
    assert any_log.get(failed.id) == failed
    assert any_log.get(10**9) is None


def test_filters_and_event_types(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    _deliver_one_of_each(shop)
    assert any_log.event_types() == ["customer.created", "points.earned"]
    assert _summary(any_log.recent(outcome="failed")) == [
        ("evt_bad", "customer.created", "failed", "RuntimeError: boom on evt_bad")
    ]
    assert [row.outcome for row in any_log.recent(event_type="points.earned")] == [
        "duplicate",
        "processed",
    ]
    assert any_log.recent(event_type="points.earned", outcome="failed") == []
    assert [row.outcome for row in any_log.recent(event_id="evt_ok")] == ["duplicate", "processed"]
    newest, second, *_ = any_log.recent()
    assert [row.id for row in any_log.recent(2, before=newest.id)] == [
        second.id,
        second.id - 1,
    ]


def test_rerun_of_a_failed_event_after_the_fix(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    (failed,) = any_log.recent(outcome="failed")
    shop.broken = False
    token = shop.csrf_token(failed.id)

    response = shop.rerun(failed.id, token)
    assert response.status_code == 303
    assert response.headers["Location"] == f"{PAGE}/{failed.id}"
    assert shop.handled == ["evt_1"]
    assert [row.outcome for row in any_log.recent(event_id="evt_1")] == ["processed", "failed"]
    page = shop.browser.get(response.headers["Location"]).get_data(as_text=True)
    assert "Re-run of evt_1: processed." in page
    assert "Every delivery of this event" in page

    # The event is done now: a second press runs nothing.
    shop.rerun(failed.id, token)
    assert shop.handled == ["evt_1"]
    page = shop.browser.get(f"{PAGE}/{failed.id}").get_data(as_text=True)
    assert "Re-run of evt_1: duplicate." in page


def test_rerun_that_fails_again_is_recorded(shop: Shop) -> None:
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    (failed,) = shop.log.recent()
    response = shop.rerun(failed.id, shop.csrf_token(failed.id))
    assert response.status_code == 303
    assert [row.outcome for row in shop.log.recent()] == ["failed", "failed"]
    page = shop.browser.get(response.headers["Location"]).get_data(as_text=True)
    assert '<div class="flash error" role="status">Re-run of evt_1: failed.</div>' in page


def test_only_a_failed_delivery_can_be_rerun(shop: Shop) -> None:
    shop.sender.send("points.earned", id="evt_1")
    (processed,) = shop.log.recent()
    with shop.browser.session_transaction() as session:
        session["_ploints_csrf"] = "known-token"
    response = shop.rerun(processed.id, "known-token")
    assert response.status_code == 303
    page = shop.browser.get(f"{PAGE}/{processed.id}").get_data(as_text=True)
    assert "Only a failed delivery can be re-run." in page
    assert "Re-run</button>" not in page
    assert shop.handled == ["evt_1"]
    assert shop.rerun(10**9, "known-token").status_code == 404


@pytest.mark.parametrize("token", [None, "", "not-the-token"])
def test_rerun_needs_the_csrf_token(shop: Shop, token: str | None) -> None:
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    shop.broken = False
    (failed,) = shop.log.recent()
    shop.csrf_token(failed.id)
    response = shop.rerun(failed.id, token)
    assert response.status_code == 400
    assert "CSRF token is" in response.get_data(as_text=True)
    assert shop.handled == []
    assert len(shop.log.recent()) == 1


def test_token_of_another_session_is_refused(shop: Shop) -> None:
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    shop.broken = False
    (failed,) = shop.log.recent()
    stolen = shop.csrf_token(failed.id)
    other = shop.app.test_client()
    other.get(f"{PAGE}/{failed.id}")
    assert other.post(f"{PAGE}/{failed.id}/rerun", data={"csrf_token": stolen}).status_code == 400
    assert shop.handled == []


def test_list_page_filters(shop: Shop) -> None:
    _deliver_one_of_each(shop)
    page = shop.browser.get(PAGE).get_data(as_text=True)
    # Rejected requests are listed only when filtered for, and counted.
    assert page.count('<span class="badge ') == 3
    assert "invalid signature" not in page and "evt_forged" not in page
    assert "2 rejected requests in the last 24 hours are not listed here" in page
    assert '<option value="customer.created">customer.created</option>' in page

    page = shop.browser.get(f"{PAGE}/?outcome=rejected").get_data(as_text=True)
    assert page.count('<span class="badge rejected">') == 2
    assert "invalid signature" in page and "evt_forged" not in page
    assert "not listed here" not in page

    page = shop.browser.get(f"{PAGE}/?outcome=failed").get_data(as_text=True)
    assert page.count('<span class="badge ') == 1
    assert '<span class="badge failed">failed</span>' in page
    assert '<option value="failed" selected>failed</option>' in page

    page = shop.browser.get(f"{PAGE}/?type=points.earned").get_data(as_text=True)
    assert page.count('<span class="badge ') == 2
    page = shop.browser.get(f"{PAGE}/?type=points.earned&outcome=failed").get_data(as_text=True)
    assert "No deliveries match these filters." in page
    # An unknown value is ignored rather than answered with an error.
    page = shop.browser.get(f"{PAGE}/?outcome=nonsense").get_data(as_text=True)
    assert page.count('<span class="badge ') == 3


def test_a_flood_of_forged_requests_cannot_push_deliveries_off_the_page(shop: Shop) -> None:
    assert shop.sender.send("points.earned", id="evt_real").status_code == 200
    forged = json.dumps(build_event("points.earned", id="evt_forged")).encode()
    for _ in range(120):
        assert shop.sender.post(forged, signature="0" * 64).status_code == 401
    page = shop.browser.get(PAGE).get_data(as_text=True)
    assert "evt_real" in page
    assert "120 rejected requests in the last 24 hours are not listed here" in page


@pytest.mark.parametrize(
    "path",
    [
        "/0",
        "/9223372036854775808",
        "/99999999999999999999999999",
        "/?before=9223372036854775808",
        "/?before=-1",
        "/?before=0",
        "/?before=abc",
    ],
)
def test_ids_and_cursors_out_of_range_are_404(shop: Shop, path: str) -> None:
    shop.sender.send("points.earned", id="evt_1")
    response = shop.browser.get(PAGE + path)
    assert response.status_code == 404
    assert "404 Not Found" in response.get_data(as_text=True)


def test_the_largest_id_is_looked_up(shop: Shop) -> None:
    shop.sender.send("points.earned", id="evt_1")
    assert shop.browser.get(f"{PAGE}/9223372036854775807").status_code == 404
    response = shop.browser.post(f"{PAGE}/99999999999999999999/rerun")
    assert response.status_code in (400, 404)


def test_list_page_pages_back(shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flask_ploints.delivery_log._page.PAGE_SIZE", 2)
    for number in range(5):
        shop.sender.send("points.earned", id=f"evt_{number}")
    page = shop.browser.get(PAGE).get_data(as_text=True)
    assert "evt_4" in page and "evt_3" in page and "evt_2" not in page
    older = re.search(r'href="([^"]*before=\d+[^"]*)">Older', page)
    assert older is not None
    page = shop.browser.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert "evt_2" in page and "evt_1" in page and "evt_4" not in page
    assert "Newest" in page


def test_detail_page_shows_payload_and_traceback_escaped(shop: Shop) -> None:
    shop.broken = True
    data = {"customerEmail": "<script>alert(1)</script>@example.com", "amount": 5}
    shop.sender.send("points.earned", data, id="evt_<b>")
    (failed,) = shop.log.recent()
    page = shop.browser.get(f"{PAGE}/{failed.id}").get_data(as_text=True)
    assert "<script>alert" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@example.com" in page
    assert "\n    &#34;amount&#34;: 5\n  }\n}</pre>" in page  # pretty-printed
    assert '<pre class="traceback">Traceback (most recent call last):' in page
    assert "RuntimeError: boom on evt_&lt;b&gt;" in page
    assert '<button type="submit">Re-run</button>' in page


def test_detail_of_a_rejected_request_has_no_payload(shop: Shop) -> None:
    shop.sender.post(b'{"secret": "forged"}', signature="0" * 64)
    (rejected,) = shop.log.recent()
    page = shop.browser.get(f"{PAGE}/{rejected.id}").get_data(as_text=True)
    assert "invalid signature" in page
    assert "a rejected request is unverified, so its body is never stored" in page
    assert "forged" not in page and "Re-run" not in page
    assert shop.browser.get(f"{PAGE}/{10**9}").status_code == 404


def test_page_headers(shop: Shop) -> None:
    response = shop.browser.get(PAGE)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None and f'<style nonce="{nonce.group(1)}">' in response.get_data(
        as_text=True
    )
    assert "frame-ancestors 'none'" in policy and "script-src" not in policy


def test_access_check_runs_before_every_request(shop: Shop) -> None:
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    shop.broken = False
    (failed,) = shop.log.recent()
    token = shop.csrf_token(failed.id)
    calls = shop.access_calls
    shop.allowed = False
    assert shop.browser.get(PAGE).status_code == 403
    assert shop.browser.get(f"{PAGE}/{failed.id}").status_code == 403
    assert shop.rerun(failed.id, token).status_code == 403
    assert shop.access_calls == calls + 3
    assert shop.handled == []
    # The webhook endpoint is not behind the page's access check.
    assert shop.sender.send("points.earned", id="evt_2").status_code == 200


def test_the_log_is_off_by_default() -> None:
    app, _ = build_app({"SECRET_KEY": "x"})
    assert EXTENSION_KEY not in app.extensions
    assert app.test_client().get(PAGE).status_code == 404
    with pytest.raises(RuntimeError, match="the delivery log is off"):
        delivery_log(app)


def test_refuses_to_start_without_an_access_check(sqlite_log: DeliveryLog) -> None:
    with pytest.raises(ConfigError, match=r"^PLOINTS_DELIVERY_LOG_ACCESS is not set"):
        build_app({"SECRET_KEY": "x", "PLOINTS_DELIVERY_LOG": sqlite_log})
    with pytest.raises(ConfigError, match=r"^PLOINTS_DELIVERY_LOG_ACCESS must be a function"):
        build_app(
            {
                "SECRET_KEY": "x",
                "PLOINTS_DELIVERY_LOG": sqlite_log,
                "PLOINTS_DELIVERY_LOG_ACCESS": True,
            }
        )


def test_refuses_to_start_without_a_secret_key(sqlite_log: DeliveryLog) -> None:
    with pytest.raises(ConfigError, match=r"^SECRET_KEY is not set"):
        build_app({"PLOINTS_DELIVERY_LOG": sqlite_log, "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("PLOINTS_DELIVERY_LOG", 42, r"^PLOINTS_DELIVERY_LOG must be a database URL"),
        ("PLOINTS_DELIVERY_LOG", "nonsense://x", r"^PLOINTS_DELIVERY_LOG: "),
        ("PLOINTS_DELIVERY_LOG_URL", "deliveries", r"^PLOINTS_DELIVERY_LOG_URL must be a path"),
        ("PLOINTS_DELIVERY_LOG_RETENTION", -1, r"^PLOINTS_DELIVERY_LOG_RETENTION must be positive"),
        ("PLOINTS_DELIVERY_LOG_RETENTION", "1d", r"^PLOINTS_DELIVERY_LOG_RETENTION must be"),
    ],
)
def test_wrong_settings_name_their_key(key: str, value: object, message: str) -> None:
    config = {
        "SECRET_KEY": "x",
        "PLOINTS_DELIVERY_LOG": "sqlite://",
        "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True,
        key: value,
    }
    with pytest.raises(ConfigError, match=message):
        build_app(config)


def test_a_url_and_its_own_page_address(tmp_path: Path) -> None:
    app, _ = build_app(
        {
            "SECRET_KEY": "x",
            "PLOINTS_DELIVERY_LOG": f"sqlite:///{tmp_path / 'log.db'}",
            "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True,
            "PLOINTS_DELIVERY_LOG_URL": "/admin/webhooks/",
            "PLOINTS_DELIVERY_LOG_RETENTION": 3600,
        }
    )
    log = delivery_log(app)
    assert (log.table.name, log.retention) == ("ploints_deliveries", 3600.0)
    PlointsClient(app).send("badge.issued", id="evt_1")
    page = app.test_client().get("/admin/webhooks/").get_data(as_text=True)
    assert "evt_1" in page
    log.engine.dispose()


def test_two_instances_share_one_log(sqlite_log: DeliveryLog) -> None:
    shop = Shop(sqlite_log)
    second = PlointsWebhooks(name="second", url="/webhooks/second", secret="whsec_second")
    second.init_app(shop.app)
    shop.sender.send("points.earned", id="evt_1")
    PlointsClient(shop.app, "second").send("points.earned", id="evt_2")
    assert [(row.event_id, row.name) for row in sqlite_log.recent()] == [
        ("evt_2", "second"),
        ("evt_1", "ploints"),
    ]
    page = shop.browser.get(PAGE).get_data(as_text=True)
    assert '<th class="hide-narrow">Endpoint</th>' in page


def test_a_failing_log_never_changes_the_answer(
    sqlite_log: DeliveryLog, caplog: pytest.LogCaptureFixture
) -> None:
    shop = Shop(sqlite_log)
    sqlite_log.create_table()
    sqlite_log.table.drop(sqlite_log.engine)
    with caplog.at_level(logging.ERROR, "flask_ploints"):
        assert shop.sender.send("points.earned", id="evt_1").status_code == 200
        assert shop.sender.send("points.earned", id="evt_1").status_code == 200
    assert shop.handled == ["evt_1"]
    messages = [record.getMessage() for record in caplog.records]
    # The duplicate's row is skipped without trying: the log pauses after
    # a failure rather than make every delivery wait on its database.
    assert messages == [
        "the delivery log failed to record a processed delivery; it skips its rows for 30 s"
    ]
    # The payload is not in the logged error (SQLAlchemy echoes parameters).
    assert all("evt_1" not in record.exc_text for record in caplog.records if record.exc_text)


def test_purge_and_retention(sqlite_log: DeliveryLog) -> None:
    now = time.time()
    sqlite_log.retention = None
    for age in (10, 100, 1000):
        sqlite_log.record(
            "rejected", name="ploints", reason="invalid signature", received_at=now - age
        )
    assert sqlite_log.purge(50, now=now) == 2
    assert [round(now - row.received_at) for row in sqlite_log.recent()] == [10]

    kept = DeliveryLog(sqlite_log.engine, table_name=sqlite_log.table.name, retention=5)
    kept.record("rejected", name="ploints", reason="old", received_at=now - 60)
    # The next record purges what is past the retention.
    kept.record("rejected", name="ploints", reason="new")
    assert [row.reason for row in kept.recent()] == ["new"]


def test_record_refuses_what_it_must_not_keep(sqlite_log: DeliveryLog) -> None:
    event = Event(id="evt_1", type="points.earned", timestamp=None, data={}, raw=b"{}")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unverified"):
        sqlite_log.record("rejected", name="ploints", event=event)
    with pytest.raises(ValueError, match="unknown outcome"):
        sqlite_log.record("lost", name="ploints")


def test_the_docs_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).parent.parent / "docs" / "examples" / "delivery_log.py"
    spec = importlib.util.spec_from_file_location("delivery_log_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setenv("SECRET_KEY", "example-key")
    monkeypatch.setenv("PLOINTS_WEBHOOK_SECRET", "whsec_example")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    app = example.create_app()
    app.testing = True
    PlointsClient(app).send("points.earned", id="evt_1")
    browser = app.test_client()
    assert browser.get(PAGE).status_code == 403
    with browser.session_transaction() as session:
        session["role"] = "staff"
    page = browser.get(PAGE)
    assert page.status_code == 200 and "evt_1" in page.get_data(as_text=True)
    delivery_log(app).engine.dispose()
    app.extensions["ploints"]["ploints"].store.engine.dispose()


def test_rerun_while_in_flight_or_with_the_store_down(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    shop.broken = False
    (failed,) = shop.log.recent()
    token = shop.csrf_token(failed.id)
    store = shop.webhooks.receiver(shop.app).store
    claim = store.claim("evt_1", 60)
    shop.rerun(failed.id, token)
    page = shop.browser.get(f"{PAGE}/{failed.id}").get_data(as_text=True)
    assert "Re-run of evt_1 refused: event &#39;evt_1&#39; is being processed right now" in page
    store.release("evt_1", claim.token)

    def down(*args: object) -> t.NoReturn:
        raise StoreError("database: OperationalError: connection refused")

    monkeypatch.setattr(store, "claim", down)
    shop.rerun(failed.id, token)
    page = shop.browser.get(f"{PAGE}/{failed.id}").get_data(as_text=True)
    assert "the dedupe store or the queue is unavailable. Nothing ran" in page
    assert shop.handled == []
    assert len(shop.log.recent()) == 1


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///{tmp}/log.db"])
def test_a_log_from_a_sqlite_url_records(url: str, tmp_path: Path) -> None:
    # In memory, SQLite's engine has a pool that takes no timeout argument.
    log = DeliveryLog.from_url(url.format(tmp=tmp_path))
    try:
        row = log.record("rejected", name="ploints", reason="invalid signature")
        assert [delivery.id for delivery in log.recent()] == [row]
    finally:
        log.engine.dispose()


# Endpoints for many accounts.

ACCOUNT_SECRETS = {"m1": "whsec_m1", "m2": "whsec_m2"}


def _accounts_shop(log: DeliveryLog) -> tuple[Shop, list[tuple[str | None, str]]]:
    shop = Shop(
        log,
        PLOINTS_WEBHOOK_URL="/webhooks/ploints/<account>",
        PLOINTS_WEBHOOK_SECRET=ACCOUNT_SECRETS.get,
    )
    seen: list[tuple[str | None, str]] = []
    shop.webhooks.on_any(lambda event: seen.append((event.account, event.id)))
    return shop, seen


def _accounts(rows: list[Delivery]) -> list[tuple[str | None, str | None, str]]:
    return [(row.account, row.event_id, row.outcome) for row in rows]


def test_the_account_of_each_delivery_is_shown_and_filtered(any_log: DeliveryLog) -> None:
    shop, _ = _accounts_shop(any_log)
    shop.sender.send("points.earned", id="evt_1", account="m1")
    shop.sender.send("points.earned", id="evt_1", account="m2")
    shop.sender.send("points.earned", id="evt_1", account="m2")
    forged = json.dumps(build_event("points.earned", id="evt_2")).encode()
    assert shop.sender.post(forged, signature="0" * 64, account="m1").status_code == 401
    assert _accounts(any_log.recent()) == [
        (None, None, "rejected"),
        ("m2", "evt_1", "duplicate"),
        ("m2", "evt_1", "processed"),
        ("m1", "evt_1", "processed"),
    ]
    # The URL's account of a forged request is kept apart, as unverified.
    assert any_log.recent()[0].reason == (
        "invalid signature (to account 'm1' per its URL, unverified)"
    )
    assert _accounts(any_log.recent(account="m1")) == [("m1", "evt_1", "processed")]
    assert any_log.recent(account="m9") == []

    page = shop.browser.get(f"{PAGE}?account=m2").get_data(as_text=True)
    assert "<th>Account</th>" in page
    assert '<input type="text" name="account" value="m2"' in page
    assert page.count(f'<a href="{PAGE}?account=m2">m2</a>') == 2
    assert f'<a href="{PAGE}?account=m1">m1</a>' not in page
    page = shop.browser.get(f"{PAGE}?account=m1&outcome=rejected").get_data(as_text=True)
    assert page.count('<span class="badge rejected">rejected</span>') == 0
    page = shop.browser.get(f"{PAGE}?outcome=rejected").get_data(as_text=True)
    assert page.count('<span class="badge rejected">rejected</span>') == 1
    assert "(to account &#39;m1&#39; per its URL, unverified)" in page


def test_an_endpoint_of_one_account_has_no_account_column(shop: Shop) -> None:
    shop.sender.send("points.earned", id="evt_1")
    assert _accounts(shop.log.recent()) == [(None, "evt_1", "processed")]
    page = shop.browser.get(PAGE).get_data(as_text=True)
    assert "<th>Account</th>" not in page
    assert 'name="account"' not in page


def test_rerun_runs_with_the_account_of_the_delivery(sqlite_log: DeliveryLog) -> None:
    shop, seen = _accounts_shop(sqlite_log)
    shop.broken = True
    assert shop.sender.send("points.earned", id="evt_1", account="m1").status_code == 500
    shop.broken = False
    (failed,) = sqlite_log.recent(outcome="failed")
    assert failed.account == "m1"
    detail = shop.browser.get(f"{PAGE}/{failed.id}").get_data(as_text=True)
    assert '<dt>Account</dt><dd class="mono">m1</dd>' in detail
    response = shop.rerun(failed.id, shop.csrf_token(failed.id))
    assert response.status_code == 303
    page = shop.browser.get(response.headers["Location"]).get_data(as_text=True)
    assert "Re-run of evt_1: processed." in page
    assert seen == [("m1", "evt_1")]
    # Processed for m1, under m1's key: m1's next copy is a duplicate, and
    # m2's event of the same id its own.
    assert shop.sender.send("points.earned", id="evt_1", account="m1").get_json() == {
        "received": True,
        "duplicate": True,
    }
    assert shop.sender.send("points.earned", id="evt_1", account="m2").status_code == 200
    assert seen == [("m1", "evt_1"), ("m2", "evt_1")]


#: The columns a pre-release build's table lacks.
LATER_COLUMNS = ("account", "status", "client", "search")


def _table_of_a_prerelease_build(log: DeliveryLog) -> None:
    """Create the log's table as a build before the release did, without
    :data:`LATER_COLUMNS` and their index, with one row in it.
    """
    full = make_table(log.table.name)
    old = sa.Table(
        full.name,
        sa.MetaData(),
        *(
            sa.Column(
                column.name,
                column.type,
                primary_key=column.primary_key,
                nullable=column.nullable,
                autoincrement=column.primary_key,
            )
            for column in full.columns
            if column.name not in LATER_COLUMNS
        ),
    )
    old.create(log.engine)
    with log.engine.begin() as connection:
        connection.execute(
            sa.insert(old).values(
                received_at=time.time() - 60,
                name="ploints",
                event_id="evt_old",
                event_type="points.earned",
                outcome="processed",
            )
        )


def _columns(log: DeliveryLog) -> set[str]:
    return {column["name"] for column in sa.inspect(log.engine).get_columns(log.table.name)}


#: The statements that add LATER_COLUMNS, on each database, for a table
#: named ``{name}``.
FIXES = {
    "sqlite": [
        "ALTER TABLE {name} ADD COLUMN account VARCHAR(128)",
        "ALTER TABLE {name} ADD COLUMN status SMALLINT",
        "ALTER TABLE {name} ADD COLUMN client VARCHAR(64)",
        "ALTER TABLE {name} ADD COLUMN search TEXT",
        "CREATE INDEX ix_{name}_account ON {name} (account)",
    ],
    "postgresql": [
        "ALTER TABLE {name} ADD COLUMN account VARCHAR(128)",
        "ALTER TABLE {name} ADD COLUMN status SMALLINT",
        "ALTER TABLE {name} ADD COLUMN client VARCHAR(64)",
        "ALTER TABLE {name} ADD COLUMN search TEXT",
        "CREATE INDEX ix_{name}_account ON {name} (account)",
    ],
    # MariaDB, whose dialect is SQLAlchemy's mysql.
    "mysql": [
        "ALTER TABLE {name} ADD COLUMN account VARCHAR(128) CHARACTER SET utf8mb4"
        " COLLATE utf8mb4_nopad_bin",
        "ALTER TABLE {name} ADD COLUMN status SMALLINT",
        "ALTER TABLE {name} ADD COLUMN client VARCHAR(64)",
        "ALTER TABLE {name} ADD COLUMN search TEXT",
        "CREATE INDEX ix_{name}_account ON {name} (account)",
    ],
}


@pytest.mark.parametrize("create_table", [True, False])
def test_a_table_that_lacks_columns_is_refused_with_the_statements_that_add_them(
    any_log: DeliveryLog, create_table: bool, caplog: pytest.LogCaptureFixture
) -> None:
    _table_of_a_prerelease_build(any_log)
    name = any_log.table.name
    log = DeliveryLog(any_log.engine, table_name=name, create_table=create_table)
    shop, seen = _accounts_shop(log)
    with caplog.at_level(logging.ERROR, "flask_ploints"):
        # The endpoint answers as ever; the row is what is refused.
        assert shop.sender.send("points.earned", id="evt_new", account="m1").status_code == 200
    assert seen == [("m1", "evt_new")]
    assert [record.getMessage() for record in caplog.records] == [
        "the delivery log failed to record a processed delivery; it skips its rows for 30 s"
    ]
    fixes = [fix.format(name=name) for fix in FIXES[log.engine.dialect.name]]
    expected = (
        f"the table {name!r} lacks the columns account, status, client, search of the delivery"
        f" log; fix it with: {'; '.join(fixes)}"
    )
    with pytest.raises(DeliveryLogError) as refused:
        log.recent()
    assert str(refused.value) == expected
    # Nothing was added behind the app's back.
    assert not set(LATER_COLUMNS) & _columns(log)
    with log.engine.begin() as connection:
        for fix in fixes:
            connection.execute(sa.text(fix))
    # The same log, without a restart, then works: old rows of no account.
    assert _accounts(log.recent()) == [(None, "evt_old", "processed")]
    shop, seen = _accounts_shop(log)
    assert shop.sender.send("points.earned", id="evt_newer", account="m2").status_code == 200
    assert _accounts(log.recent(account="m2")) == [("m2", "evt_newer", "processed")]
    assert [row.event_id for row in log.recent(q="EVT_NEWER")] == ["evt_newer"]
    indexes = {index["name"] for index in sa.inspect(log.engine).get_indexes(name)}
    assert f"ix_{name}_account" in indexes


# The access check: only True grants.


def _failed_row(shop: Shop, event_id: str = "evt_1") -> Delivery:
    shop.broken = True
    assert shop.sender.send("points.earned", id=event_id).status_code == 500
    shop.broken = False
    (failed,) = shop.log.recent(outcome="failed", event_id=event_id)
    return failed


def test_only_true_grants_access(sqlite_log: DeliveryLog) -> None:
    shop = Shop(sqlite_log)
    failed = _failed_row(shop)
    token = shop.csrf_token(failed.id)

    @hypothesis.given(
        hypothesis.strategies.one_of(
            hypothesis.strategies.none(),
            hypothesis.strategies.booleans(),
            hypothesis.strategies.integers(),
            hypothesis.strategies.floats(allow_nan=True),
            hypothesis.strategies.text(),
            hypothesis.strategies.binary(),
            hypothesis.strategies.lists(hypothesis.strategies.integers()),
            hypothesis.strategies.dictionaries(
                hypothesis.strategies.text(), hypothesis.strategies.integers()
            ),
        ).filter(lambda value: value is not True)
    )
    @hypothesis.settings(max_examples=60, deadline=None)
    def refused(answer: object) -> None:
        shop.allowed = answer  # type: ignore[assignment]
        assert shop.browser.get(PAGE).status_code == 403
        assert shop.browser.get(f"{PAGE}/{failed.id}").status_code == 403
        assert shop.rerun(failed.id, token).status_code == 403

    refused()
    assert shop.handled == []
    shop.allowed = True
    assert shop.browser.get(PAGE).status_code == 200


def test_a_response_from_the_check_is_what_the_visitor_gets(sqlite_log: DeliveryLog) -> None:
    logged_in = True
    shop = Shop(
        sqlite_log,
        PLOINTS_DELIVERY_LOG_ACCESS=lambda: logged_in or flask.redirect("/login"),
    )
    failed = _failed_row(shop)
    token = shop.csrf_token(failed.id)
    logged_in = False
    for response in (
        shop.browser.get(PAGE),
        shop.browser.get(f"{PAGE}/{failed.id}"),
        shop.rerun(failed.id, token),
    ):
        assert response.status_code == 302
        assert response.headers["Location"] == "/login"
    assert shop.handled == []


def test_an_exception_in_the_check_is_the_apps_own_error(sqlite_log: DeliveryLog) -> None:
    def access() -> bool:
        raise LookupError("no such user")

    app, _ = build_app(
        {
            "SECRET_KEY": "x",
            "PLOINTS_DELIVERY_LOG": sqlite_log,
            "PLOINTS_DELIVERY_LOG_ACCESS": access,
        }
    )
    seen: list[str] = []

    @app.errorhandler(LookupError)
    def handle(error: LookupError) -> tuple[str, int]:
        seen.append(str(error))
        return "sign in again", 401

    response = app.test_client().get(PAGE)
    assert (response.status_code, response.get_data(as_text=True)) == (401, "sign in again")
    assert seen == ["no such user"]


class User(flask_login.UserMixin):  # type: ignore[misc]
    def __init__(self, user_id: str, *, is_staff: bool) -> None:
        self.id = user_id
        self.is_staff = is_staff


def _login_app(log: DeliveryLog, access: t.Callable[[], object]) -> Flask:
    users = {"ann": User("ann", is_staff=True), "bob": User("bob", is_staff=False)}
    app, _ = build_app(
        {"SECRET_KEY": "x", "PLOINTS_DELIVERY_LOG": log, "PLOINTS_DELIVERY_LOG_ACCESS": access}
    )
    manager = flask_login.LoginManager(app)
    manager.user_loader(users.get)

    @app.get("/login/<user_id>")
    def login(user_id: str) -> str:
        flask_login.login_user(users[user_id])
        return "in"

    return app


def test_the_documented_check_with_flask_login(sqlite_log: DeliveryLog) -> None:
    from flask_login import current_user

    app = _login_app(sqlite_log, lambda: current_user.is_authenticated and current_user.is_staff)
    anonymous = app.test_client()
    assert anonymous.get(PAGE).status_code == 403
    staff = app.test_client()
    assert staff.get("/login/ann").status_code == 200
    assert staff.get(PAGE).status_code == 200
    other = app.test_client()
    assert other.get("/login/bob").status_code == 200
    assert other.get(PAGE).status_code == 403


def test_the_login_redirect_idiom_with_flask_login(sqlite_log: DeliveryLog) -> None:
    from flask_login import current_user

    app = _login_app(
        sqlite_log, lambda: current_user.is_authenticated or flask.redirect("/login/ann")
    )
    client = app.test_client()
    response = client.get(PAGE)
    assert (response.status_code, response.headers["Location"]) == (302, "/login/ann")
    assert client.get("/login/ann").status_code == 200
    assert client.get(PAGE).status_code == 200


@pytest.mark.parametrize(
    "access",
    [
        lambda account, other: True,
        lambda *, account: True,
    ],
)
def test_a_check_of_more_than_the_account_is_refused(
    sqlite_log: DeliveryLog, access: t.Callable[..., object]
) -> None:
    with pytest.raises(
        ConfigError, match=r"^PLOINTS_DELIVERY_LOG_ACCESS must be a function taking no arguments"
    ):
        build_app(
            {
                "SECRET_KEY": "x",
                "PLOINTS_DELIVERY_LOG": sqlite_log,
                "PLOINTS_DELIVERY_LOG_ACCESS": access,
            }
        )


# Per-account scoping.


class Staff:
    """A scoped access check: admits the accounts in ``accounts``, and every
    account when ``everything``; records what it was asked.
    """

    def __init__(self, *accounts: str, everything: bool = False) -> None:
        self.accounts = set(accounts)
        self.everything = everything
        self.asked: list[str | None] = []

    def __call__(self, account: str | None) -> bool:
        self.asked.append(account)
        if account is None:
            return self.everything
        return self.everything or account in self.accounts


def _scoped_shop(log: DeliveryLog, staff: Staff) -> Shop:
    shop = Shop(
        log,
        PLOINTS_WEBHOOK_URL="/webhooks/ploints/<account>",
        PLOINTS_WEBHOOK_SECRET=ACCOUNT_SECRETS.get,
        PLOINTS_DELIVERY_LOG_ACCESS=staff,
    )
    assert shop.app.extensions[EXTENSION_KEY].scoped is True
    return shop


def _deliver_to_two_accounts(shop: Shop) -> dict[str, Delivery]:
    """m1: processed; m2: processed, then a failed customer.created; a
    forged request that names m1 in its URL.
    """
    assert shop.sender.send("points.earned", id="evt_1", account="m1").status_code == 200
    assert shop.sender.send("points.earned", id="evt_2", account="m2").status_code == 200
    shop.broken = True
    assert shop.sender.send("customer.created", id="evt_3", account="m2").status_code == 500
    shop.broken = False
    forged = json.dumps(build_event("points.earned", id="evt_4")).encode()
    assert shop.sender.post(forged, signature="0" * 64, account="m1").status_code == 401
    rows = shop.log.recent()
    return {
        "m1": next(row for row in rows if row.account == "m1"),
        "m2": next(row for row in rows if row.event_id == "evt_2"),
        "m2 failed": next(row for row in rows if row.outcome == "failed"),
        "rejected": next(row for row in rows if row.outcome == "rejected"),
    }


def _listed(page: str) -> list[str]:
    return re.findall(r'<td class="mono id"><a href="[^"]+">(evt_\w+)</a></td>', page)


def test_a_scoped_check_shows_only_the_rows_of_its_accounts(any_log: DeliveryLog) -> None:
    staff = Staff("m1")
    shop = _scoped_shop(any_log, staff)
    rows = _deliver_to_two_accounts(shop)

    page = shop.browser.get(PAGE).get_data(as_text=True)
    assert _listed(page) == ["evt_1"]
    # Not even the type of another account's event, nor the forged requests.
    assert "customer.created" not in page
    assert "rejected request" not in page
    assert staff.asked == [None, "m1", "m2"]
    for query in ("?account=m2", "?outcome=rejected", "?outcome=failed", "?account=m2&type=x"):
        assert _listed(shop.browser.get(PAGE + query).get_data(as_text=True)) == []
    assert _listed(shop.browser.get(f"{PAGE}?account=m1").get_data(as_text=True)) == ["evt_1"]

    assert shop.browser.get(f"{PAGE}/{rows['m1'].id}").status_code == 200
    for refused in ("m2", "m2 failed", "rejected"):
        assert shop.browser.get(f"{PAGE}/{rows[refused].id}").status_code == 404
    # The same 404 as for an id no row has.
    assert shop.browser.get(f"{PAGE}/{10**9}").status_code == 404

    with shop.browser.session_transaction() as session:
        session["_ploints_csrf"] = "known-token"
    assert shop.rerun(rows["m2 failed"].id, "known-token").status_code == 404
    assert shop.handled == ["evt_1", "evt_2"]
    assert shop.log.recent(outcome="failed", account="m2") == [rows["m2 failed"]]


def test_a_scoped_check_reruns_the_rows_of_its_accounts(sqlite_log: DeliveryLog) -> None:
    staff = Staff("m2")
    shop = _scoped_shop(sqlite_log, staff)
    rows = _deliver_to_two_accounts(shop)
    failed = rows["m2 failed"]
    response = shop.rerun(failed.id, shop.csrf_token(failed.id))
    assert response.status_code == 303
    page = shop.browser.get(response.headers["Location"]).get_data(as_text=True)
    assert "Re-run of evt_3: processed." in page
    assert shop.handled == ["evt_1", "evt_2", "evt_3"]
    listed = _listed(shop.browser.get(PAGE).get_data(as_text=True))
    assert listed == ["evt_3", "evt_3", "evt_2"]


def test_a_scoped_check_that_admits_every_account_sees_everything(
    sqlite_log: DeliveryLog,
) -> None:
    staff = Staff(everything=True)
    shop = _scoped_shop(sqlite_log, staff)
    rows = _deliver_to_two_accounts(shop)
    page = shop.browser.get(PAGE).get_data(as_text=True)
    assert _listed(page) == ["evt_3", "evt_2", "evt_1"]
    assert "1 rejected request in the last 24 hours is not listed here" in page
    assert staff.asked == [None]
    for row in rows.values():
        assert shop.browser.get(f"{PAGE}/{row.id}").status_code == 200


def test_a_scoped_check_sees_no_rows_of_an_endpoint_of_one_account(
    sqlite_log: DeliveryLog,
) -> None:
    shop = Shop(sqlite_log, PLOINTS_DELIVERY_LOG_ACCESS=Staff("m1"))
    failed = _failed_row(shop)
    assert _listed(shop.browser.get(PAGE).get_data(as_text=True)) == []
    assert shop.browser.get(f"{PAGE}/{failed.id}").status_code == 404


@pytest.mark.parametrize(
    "access",
    [
        lambda account: account == "m1",
        lambda account=None: account == "m1",
        lambda *accounts: accounts == ("m1",),
    ],
)
def test_the_check_takes_the_account_when_it_has_a_parameter(
    sqlite_log: DeliveryLog, access: t.Callable[..., bool]
) -> None:
    app, _ = build_app(
        {
            "SECRET_KEY": "x",
            "PLOINTS_DELIVERY_LOG": sqlite_log,
            "PLOINTS_DELIVERY_LOG_ACCESS": access,
            "PLOINTS_WEBHOOK_URL": "/webhooks/ploints/<account>",
            "PLOINTS_WEBHOOK_SECRET": ACCOUNT_SECRETS.get,
        }
    )
    assert app.extensions[EXTENSION_KEY].scoped is True
    sender = PlointsClient(app)
    assert sender.send("points.earned", id="evt_1", account="m1").status_code == 200
    assert sender.send("points.earned", id="evt_2", account="m2").status_code == 200
    assert _listed(app.test_client().get(PAGE).get_data(as_text=True)) == ["evt_1"]


# Flask-SQLAlchemy's db, and no SQLAlchemy at all.


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def test_a_flask_sqlalchemy_db_is_the_log(database_url: str, unique: str) -> None:
    from flask_sqlalchemy import SQLAlchemy

    # The default table, which earlier builds may have made with another
    # collation (refused on first use): this test makes it anew.
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS ploints_deliveries"))
    engine.dispose()
    db = SQLAlchemy()
    app, _ = build_app(
        {
            "SECRET_KEY": "x",
            "SQLALCHEMY_DATABASE_URI": database_url,
            "PLOINTS_DELIVERY_LOG": db,
            "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True,
        }
    )
    # After the extension: the log asks db for its engine on first use.
    db.init_app(app)
    log = delivery_log(app)
    try:
        assert PlointsClient(app).send("points.earned", id=unique).status_code == 200
        with app.app_context():
            assert log.engine is db.engine
            (row,) = log.recent(event_id=unique)
        assert (row.event_type, row.outcome) == ("points.earned", "processed")
        page = app.test_client().get(f"{PAGE}/{row.id}").get_data(as_text=True)
        assert f'<h1 class="mono">{unique}</h1>' in page
    finally:
        with app.app_context():
            with db.engine.begin() as connection:
                connection.execute(sa.delete(log.table).where(log.table.c.event_id == unique))
            db.engine.dispose()


def test_without_sqlalchemy_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "from flask import Flask\n"
        "from flask_ploints import ConfigError, PlointsWebhooks\n"
        "app = Flask('x')\n"
        "app.config.update(PLOINTS_WEBHOOK_SECRET='s', PLOINTS_DELIVERY_LOG='sqlite://',"
        " PLOINTS_DELIVERY_LOG_ACCESS=lambda: True, SECRET_KEY='x')\n"
        "try:\n"
        "    PlointsWebhooks(app)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == (
        "PLOINTS_DELIVERY_LOG: the delivery log needs SQLAlchemy 2; install it with:"
        ' pip install "flask-ploints[sqlalchemy]"\n'
    )


def test_the_docs_name_the_template_folder_that_exists() -> None:
    root = Path(__file__).parent.parent
    text = (root / "docs" / "delivery-log.rst").read_text()
    folders = re.findall(r"``(flask_ploints/[^`]*templates[^`]*)``", text)
    assert folders == ["flask_ploints/delivery_log/templates/ploints/"]
    assert sorted(path.name for path in (root / folders[0]).iterdir()) == [
        "base.html",
        "deliveries.html",
        "delivery.html",
        "error.html",
    ]


def test_the_account_filter_compares_exactly(any_log: DeliveryLog) -> None:
    # MariaDB's default collation finds "ACME" for "acme": scoping must not.
    for account, event_id in [("acme", "evt_1"), ("ACME", "evt_2"), ("acme ", "evt_3")]:
        raw = json.dumps(build_event("points.earned", id=event_id)).encode()
        any_log.record("processed", name="ploints", event=parse_event(raw, account))
    assert [row.event_id for row in any_log.recent(account="acme")] == ["evt_1"]
    assert [row.event_id for row in any_log.recent(accounts=["acme"])] == ["evt_1"]
    assert [row.event_id for row in any_log.recent(accounts=["ACME", "acme "])] == [
        "evt_3",
        "evt_2",
    ]
    assert any_log.recent(account="acme", accounts=["ACME"]) == []


def test_a_stale_skip_is_noted_on_the_processed_row(sqlite_log: DeliveryLog) -> None:
    shop = Shop(sqlite_log)

    @shop.webhooks.on(
        "customer.tier_changed", latest_by=lambda e: e.data["customerEmail"], name="tier"
    )
    def tier(event: Event) -> None:
        pass

    now = int(time.time())
    data = {"customerEmail": "jane@example.com", "previousTier": "Bronze", "newTier": "Gold"}
    for event_id, seconds_ago in (("evt_new", 60), ("evt_old", 3600)):
        moment = datetime.fromtimestamp(now - seconds_ago, tz=UTC)
        response = shop.sender.send("customer.tier_changed", data, id=event_id, timestamp=moment)
        assert response.status_code == 200
    newer = datetime.fromtimestamp(now - 60, tz=UTC).isoformat()
    with shop.app.app_context():
        rows = sqlite_log.recent(limit=10)
    assert _summary(list(reversed(rows))) == [
        ("evt_new", "customer.tier_changed", "processed", None),
        (
            "evt_old",
            "customer.tier_changed",
            "processed",
            f"stale for handler 'tier': key 'jane@example.com', {newer} applied",
        ),
    ]


# The operations console: find, see, act, export.

DAY = 86400.0
#: 2026-12-01T00:00:00Z
DEC_1 = 1_796_083_200.0


def _record(log: DeliveryLog, outcome: str, event_id: str, at: float, **data: t.Any) -> int:
    """Record a delivery of a points.earned event with ``data`` received at
    ``at``.
    """
    body = json.dumps(build_event("points.earned", data or None, id=event_id)).encode()
    return log.record(outcome, name="ploints", event=parse_event(body), received_at=at)


def _ids(page: str) -> list[str]:
    return re.findall(r'<td class="mono id"><a href="[^"]+">([^<]+)</a></td>', page)


def test_q_finds_an_event_by_its_id_or_any_value_of_its_payload(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    jane = {"customer": {"email": "Jane@Example.com", "tags": ["VIP", 7]}, "description": "Gift"}
    assert shop.sender.send("points.earned", jane, id="evt_Jane_1").status_code == 200
    assert (
        shop.sender.send("points.earned", {"note": "100% off_sale"}, id="evt_2").status_code == 200
    )
    assert shop.sender.send("points.earned", {"note": "100 off"}, id="evt_3").status_code == 200

    def found(q: str) -> list[str | None]:
        return [row.event_id for row in any_log.recent(q=q)]

    assert found("jane@example.com") == ["evt_Jane_1"]
    assert found("JANE@EXAMPLE") == ["evt_Jane_1"]
    assert found("evt_jane") == ["evt_Jane_1"]
    assert found("vip") == ["evt_Jane_1"]
    assert found("gift") == ["evt_Jane_1"]
    # Values only, not keys; LIKE's wildcards are literal characters.
    assert found("email") == []
    assert found("customer") == []
    assert found("100%") == ["evt_2"]
    assert found("_sale") == ["evt_2"]
    assert found("100") == ["evt_3", "evt_2"]
    assert found("evt_") == ["evt_3", "evt_2", "evt_Jane_1"]
    page = shop.browser.get(f"{PAGE}?q=Jane%40example.com").get_data(as_text=True)
    assert _ids(page) == ["evt_Jane_1"]
    assert '<input type="search" name="q" value="Jane@example.com"' in page
    # The view is in its links: paging, exports, the bulk form.
    assert f'href="{PAGE}/export.csv?q=Jane@example.com"' in page
    assert '<input type="hidden" name="q" value="Jane@example.com">' in page


def test_q_on_postgresql_uses_a_trigram_index(postgres_log: DeliveryLog) -> None:
    shop = Shop(postgres_log)
    assert shop.sender.send("points.earned", id="evt_1").status_code == 200
    name = postgres_log.table.name
    with postgres_log.engine.connect() as connection:
        definition = connection.execute(
            sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = :name"),
            {"name": f"ix_{name}_search"},
        ).scalar_one()
    assert definition == (
        f"CREATE INDEX ix_{name}_search ON public.{name} USING gin (search gin_trgm_ops)"
    )


def test_since_and_until_bound_the_period(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    _record(any_log, "processed", "evt_nov30", DEC_1 - 1)
    _record(any_log, "processed", "evt_dec1", DEC_1)
    _record(any_log, "failed", "evt_dec1_noon", DEC_1 + DAY / 2)
    _record(any_log, "processed", "evt_dec2", DEC_1 + DAY)

    def listed(query: str) -> list[str]:
        response = shop.browser.get(f"{PAGE}?{query}")
        assert response.status_code == 200, response.get_data(as_text=True)
        return _ids(response.get_data(as_text=True))

    # A date as until includes its whole day.
    assert listed("since=2026-12-01&until=2026-12-01") == ["evt_dec1_noon", "evt_dec1"]
    assert listed("since=2026-12-01") == ["evt_dec2", "evt_dec1_noon", "evt_dec1"]
    assert listed("until=2026-11-30") == ["evt_nov30"]
    # Date-times are UTC unless they name their offset; until excludes itself.
    assert listed("since=2026-12-01T12:00:00&until=2026-12-02T00:00") == ["evt_dec1_noon"]
    assert listed("since=2026-12-01T12:00:00Z&until=2026-12-01T12:00:01Z") == ["evt_dec1_noon"]
    assert listed("since=2026-12-01T13:00:00%2B01:00&until=2026-12-01T12:00:00.5") == [
        "evt_dec1_noon"
    ]
    assert listed("since=2026-12-01T12:00:00.001") == ["evt_dec2"]
    assert listed("since=2026-12-01&outcome=failed&q=noon") == ["evt_dec1_noon"]
    assert [row.event_id for row in any_log.recent(since=DEC_1, until=DEC_1 + 1)] == ["evt_dec1"]


HOSTILE = [
    "q=%00",
    "q=a%00b",
    "account=m%001",
    "type=%00",
    "since=%00",
    "q=" + "x" * 5000,
    "account=" + "a" * 5000,
    "since=2026-02-30",
    "since=2026-13-01",
    "until=2026-12-07T25:00",
    "since=99999-01-01",
    "since=0000-00-00",
    "since=yesterday",
    "until=1e9",
    "since=2026-12-02&until=2026-12-01",
    "since=2026-12-01T10:00&until=2026-12-01T10:00",
]
SQL_FRAGMENTS = [
    "q=%27%20OR%201%3D1%20--",
    "q=%25%27%3B%20DROP%20TABLE%20x%3B%20--",
    "q=%5C",
    "q=%5C%25",
    "q=%22%29%20UNION%20SELECT%201--",
    "account=%27%20OR%20%271%27%3D%271",
    "type=%27%3B--",
    "outcome=failed%27--",
    "q=%F0%9F%92%A5",
    "q=%FF%FE",
    "since=0001-01-01",
    "since=0001-01-01T00:00:00%2B01:00",
    "until=9999-12-31",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_query_strings_are_400(any_log: DeliveryLog, query: str) -> None:
    shop = Shop(any_log)
    assert shop.sender.send("points.earned", id="evt_1").status_code == 200
    for path in ("", "/export.csv", "/export.json"):
        response = shop.browser.get(f"{PAGE}{path}?{query}")
        assert response.status_code == 400, (path, response.get_data(as_text=True))


@pytest.mark.parametrize("query", SQL_FRAGMENTS)
def test_sql_fragments_in_query_strings_are_an_empty_view(any_log: DeliveryLog, query: str) -> None:
    shop = Shop(any_log)
    assert shop.sender.send("points.earned", id="evt_1").status_code == 200
    response = shop.browser.get(f"{PAGE}?{query}")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    # Unknown types and outcomes are no filter, as a select would send.
    expected = ["evt_1"] if query.startswith(("type=", "outcome=", "since=", "until=")) else []
    assert _ids(page) == expected
    exported = shop.browser.get(f"{PAGE}/export.json?{query}")
    assert exported.status_code == 200
    assert [row["event_id"] for row in exported.get_json()["deliveries"]] == expected
    assert any_log.recent(q="evt_1")[0].event_id == "evt_1"  # the table is intact


@hypothesis.settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    params=hypothesis.strategies.dictionaries(
        hypothesis.strategies.sampled_from(["q", "since", "until", "account", "type", "outcome"]),
        hypothesis.strategies.sampled_from(
            ["\x00", "a\x00", "'", "%", "_", "\\", "2026-02-30", "2026-12-07T09:30", "x" * 5000]
        )
        # Characters of dates, of SQL and LIKE, and NUL, often; any other too.
        | hypothesis.strategies.text(
            hypothesis.strategies.sampled_from("\x00%_\\'\";-:.TZ+0129 ")
            # A URL's percent-decoding never gives a lone surrogate.
            | hypothesis.strategies.characters(exclude_categories=("Cs",)),
            max_size=300,
        ),
        max_size=4,
    )
)
def test_any_query_string_is_answered_without_a_5xx(
    any_log: DeliveryLog, params: dict[str, str]
) -> None:
    shop = Shop(any_log)
    for path in ("", "/export.csv"):
        response = shop.browser.get(PAGE + path, query_string=params)
        assert response.status_code in (200, 400, 404), (params, response.status_code)


def test_the_chart_draws_the_periods_outcomes_without_script(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    now = time.time()
    _record(any_log, "processed", "evt_1", now - 3600)
    _record(any_log, "processed", "evt_2", now - 3500)
    _record(any_log, "processed", "evt_3", now - 60)
    _record(any_log, "failed", "evt_4", now - 30)
    _record(any_log, "queued", "evt_5", now - 20)
    any_log.record("rejected", name="ploints", reason="invalid signature", received_at=now - 10)
    _record(any_log, "failed", "evt_old", now - 2 * DAY)  # before the last day
    response = shop.browser.get(PAGE)
    page = response.get_data(as_text=True)
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'; style-src")
    assert "<script" not in page and " style=" not in page
    assert '<svg class="bars"' in page
    bars = re.findall(r'<rect class="bar (\w+)"[^>]*><title>(\d+) (\w+),', page)
    assert sorted(bars) == [
        ("failed", "1", "failed"),
        ("processed", "1", "processed"),
        ("processed", "2", "processed"),
        ("queued", "1", "queued"),
        ("rejected", "1", "rejected"),
    ]
    totals = dict(re.findall(r'<span class="swatch \w+"></span>(\w+) <strong>(\d+)</strong>', page))
    assert totals == {
        name: {"processed": "3", "failed": "1", "queued": "1", "rejected": "1"}.get(name, "0")
        for name in OUTCOMES
    }
    assert '<strong class="rate">25.0 %</strong>' in page
    # The period of the view: the old failure alone, at a rate of 100 %.
    old = time.strftime("%Y-%m-%d", time.gmtime(now - 2 * DAY))
    page = shop.browser.get(f"{PAGE}?since={old}&until={old}").get_data(as_text=True)
    assert re.findall(r'<rect class="bar (\w+)"', page) == ["failed"]
    assert '<strong class="rate">100.0 %</strong>' in page
    assert f'<p class="period">{old} 00:00:00 to ' in page


def test_the_chart_of_a_scoped_check_counts_only_its_accounts(any_log: DeliveryLog) -> None:
    staff = Staff("m1")
    shop = _scoped_shop(any_log, staff)
    _deliver_to_two_accounts(shop)
    page = shop.browser.get(PAGE).get_data(as_text=True)
    totals = dict(re.findall(r'<span class="swatch \w+"></span>(\w+) <strong>(\d+)</strong>', page))
    assert (totals["processed"], totals["failed"], totals["rejected"]) == ("1", "0", "0")
    assert re.findall(r'<rect class="bar (\w+)"', page) == ["processed"]


def _bulk_token(shop: Shop) -> str:
    page = shop.browser.get(PAGE).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None, page
    return match.group(1)


def _flashes(shop: Shop) -> list[str]:
    page = shop.browser.get(PAGE).get_data(as_text=True)
    return [html.unescape(text) for text in re.findall(r'role="status">([^<]*)</div>', page)]


def test_bulk_rerun_of_selected_failed_deliveries(any_log: DeliveryLog) -> None:
    shop = Shop(any_log)
    shop.broken = True
    for number in (1, 2, 3):
        assert shop.sender.send("points.earned", id=f"evt_{number}").status_code == 500
    shop.broken = False
    assert shop.sender.send("points.earned", id="evt_ok").status_code == 200
    ok, third, second, first = any_log.recent()
    page = shop.browser.get(PAGE).get_data(as_text=True)
    # Only failed rows can be selected.
    assert re.findall(r'name="id" value="(\d+)"', page) == [
        str(third.id),
        str(second.id),
        str(first.id),
    ]
    token = _bulk_token(shop)
    response = shop.browser.post(
        f"{PAGE}/rerun",
        data={"csrf_token": token, "id": [str(first.id), str(third.id), str(ok.id), "0"]},
    )
    assert (response.status_code, response.headers["Location"]) == (303, PAGE)
    assert _flashes(shop) == [
        "Re-ran 2 events: 2 processed. Not run, as not failed or not found: 2."
    ]
    assert shop.handled == ["evt_ok", "evt_1", "evt_3"]
    assert [(row.event_id, row.outcome) for row in any_log.recent(2)] == [
        ("evt_3", "processed"),
        ("evt_1", "processed"),
    ]
    # Nothing selected: nothing runs.
    response = shop.browser.post(f"{PAGE}/rerun", data={"csrf_token": token})
    assert response.status_code == 303
    assert _flashes(shop) == [
        "Select the failed deliveries to re-run, or re-run all failed in this view."
    ]


@pytest.mark.parametrize("token", [None, "", "not-the-token"])
def test_bulk_rerun_needs_the_csrf_token(shop: Shop, token: str | None) -> None:
    shop.broken = True
    shop.sender.send("points.earned", id="evt_1")
    shop.broken = False
    (failed,) = shop.log.recent()
    _bulk_token(shop)
    form: dict[str, t.Any] = {"all": "1", "id": str(failed.id)}
    if token is not None:
        form["csrf_token"] = token
    assert shop.browser.post(f"{PAGE}/rerun", data=form).status_code == 400
    assert shop.handled == []


def test_bulk_rerun_of_all_failed_in_a_view_is_bounded(sqlite_log: DeliveryLog) -> None:
    from flask_ploints.delivery_log._page import MAX_RERUN

    shop = Shop(sqlite_log)
    now = time.time()
    for number in range(MAX_RERUN + 2):
        _record(sqlite_log, "failed", f"evt_{number:03}", now - 100 + number)
    _record(sqlite_log, "failed", "evt_other", now - 200, note="elsewhere")
    # The same event failed twice: run once.
    _record(sqlite_log, "failed", f"evt_{MAX_RERUN + 1:03}", now - 1)
    token = _bulk_token(shop)
    response = shop.browser.post(
        f"{PAGE}/rerun",
        data={"csrf_token": token, "all": "1", "q": "evt_0", "outcome": "failed"},
    )
    assert (response.status_code, response.headers["Location"]) == (
        303,
        f"{PAGE}?q=evt_0&outcome=failed",
    )
    assert _flashes(shop) == [
        f"Re-ran {MAX_RERUN - 1} events: {MAX_RERUN - 1} processed. This view holds more failed"
        f" deliveries than the {MAX_RERUN} that one request re-runs: re-run again, or narrow it"
        " with since and until."
    ]
    assert shop.handled == [f"evt_{number:03}" for number in range(MAX_RERUN + 1, 2, -1)]
    ids = [str(row.id) for row in sqlite_log.recent(MAX_RERUN + 1)]
    response = shop.browser.post(f"{PAGE}/rerun", data={"csrf_token": token, "id": ids})
    assert response.status_code == 400
    assert f"At most {MAX_RERUN} deliveries are re-run per request" in response.get_data(
        as_text=True
    )
    # Another outcome's view has no failed rows to run.
    response = shop.browser.post(
        f"{PAGE}/rerun", data={"csrf_token": token, "all": "1", "outcome": "processed"}
    )
    assert _flashes(shop) == ["Re-ran 0 events."]
    assert len(shop.handled) == MAX_RERUN - 1


def test_bulk_rerun_and_exports_of_a_scoped_check(any_log: DeliveryLog) -> None:
    staff = Staff("m1")
    shop = _scoped_shop(any_log, staff)
    rows = _deliver_to_two_accounts(shop)
    shop.broken = True
    assert shop.sender.send("points.earned", id="evt_4", account="m1").status_code == 500
    shop.broken = False
    token = _bulk_token(shop)
    # Another account's failed row, selected by id: as if absent.
    response = shop.browser.post(
        f"{PAGE}/rerun", data={"csrf_token": token, "id": str(rows["m2 failed"].id)}
    )
    assert response.status_code == 303
    assert _flashes(shop) == ["Re-ran 0 events. Not run, as not failed or not found: 1."]
    # All failed in the view: m1's only, even asked for m2's account.
    shop.browser.post(f"{PAGE}/rerun", data={"csrf_token": token, "all": "1", "account": "m2"})
    assert _flashes(shop) == ["Re-ran 0 events."]
    shop.browser.post(f"{PAGE}/rerun", data={"csrf_token": token, "all": "1"})
    assert _flashes(shop) == ["Re-ran 1 event: 1 processed."]
    assert shop.handled == ["evt_1", "evt_2", "evt_4"]

    exported = shop.browser.get(f"{PAGE}/export.json").get_json()
    assert [
        (row["account"], row["event_id"], row["outcome"]) for row in exported["deliveries"]
    ] == [
        ("m1", "evt_4", "processed"),
        ("m1", "evt_4", "failed"),
        ("m1", "evt_1", "processed"),
    ]
    for query in ("?account=m2", "?outcome=rejected", "?q=evt_3"):
        assert shop.browser.get(f"{PAGE}/export.json{query}").get_json()["deliveries"] == []
        lines = shop.browser.get(f"{PAGE}/export.csv{query}").get_data(as_text=True).splitlines()
        assert lines == [",".join(EXPORT_HEADER)]


EXPORT_HEADER = (
    "id",
    "received_at",
    "endpoint",
    "account",
    "event_id",
    "event_type",
    "outcome",
    "status",
    "client",
    "reason",
    "duration",
)


def test_exports_of_a_view_as_csv_and_json(shop: Shop) -> None:
    first = _record(shop.log, "processed", "evt_1", DEC_1)
    body = json.dumps(build_event("points.earned", id="=HYPERLINK(1)")).encode()
    second = shop.log.record(
        "failed", name="ploints", event=parse_event(body), reason="-boom", received_at=DEC_1 + 1
    )
    shop.log.record("rejected", name="ploints", reason="invalid signature", received_at=DEC_1 + 2)
    response = shop.browser.get(f"{PAGE}/export.csv?since=2026-12-01")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert re.fullmatch(
        r'attachment; filename="ploints-deliveries-\d{8}T\d{6}Z\.csv"',
        response.headers["Content-Disposition"],
    )
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.get_data(as_text=True).splitlines() == [
        ",".join(EXPORT_HEADER),
        # Cells a spreadsheet would run as formulas start with a quote.
        f"{second},2026-12-01T00:00:01Z,ploints,,'=HYPERLINK(1),points.earned,failed,,,'-boom,",
        f"{first},2026-12-01T00:00:00Z,ploints,,evt_1,points.earned,processed,,,,",
    ]
    exported = shop.browser.get(f"{PAGE}/export.json?outcome=rejected").get_json()
    assert exported == {
        "deliveries": [
            {
                "id": first + 2,
                "received_at": "2026-12-01T00:00:02Z",
                "endpoint": "ploints",
                "account": None,
                "event_id": None,
                "event_type": None,
                "outcome": "rejected",
                "status": None,
                "client": None,
                "reason": "invalid signature",
                "duration": None,
            }
        ],
        "truncated": False,
    }
    assert shop.browser.get(f"{PAGE}/export.xml").status_code == 404


def test_a_rejected_request_keeps_its_status_and_client_address(sqlite_log: DeliveryLog) -> None:
    from werkzeug.middleware.proxy_fix import ProxyFix

    shop = Shop(sqlite_log)
    forged = json.dumps(build_event("points.earned", id="evt_forged")).encode()
    assert shop.sender.post(forged, signature="0" * 64).status_code == 401
    shop.app.wsgi_app = ProxyFix(shop.app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    response = shop.sender.post(
        b'["signed", "but not an event"]', headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert response.status_code == 400
    signed, unsigned = sqlite_log.recent()
    assert (unsigned.status, unsigned.client, unsigned.reason) == (
        401,
        "127.0.0.1",
        "invalid signature",
    )
    assert (signed.status, signed.client, signed.reason) == (
        400,
        "203.0.113.9",
        "body is not a JSON object",
    )
    assert (signed.payload, signed.event_id) == (None, None)
    page = shop.browser.get(f"{PAGE}?outcome=rejected").get_data(as_text=True)
    assert (
        '<span class="mono">400</span> from <span class="mono">203.0.113.9</span>'
        " · body is not a JSON object</td>"
    ) in page
    detail = shop.browser.get(f"{PAGE}/{signed.id}").get_data(as_text=True)
    assert '<dt>Answered</dt><dd class="mono">400</dd>' in detail
    assert '<dt>From</dt><dd class="mono">203.0.113.9</dd>' in detail
    assert "but not an event" not in detail


def test_the_charts_counts_compare_accounts_exactly(any_log: DeliveryLog) -> None:
    from flask_ploints.delivery_log._chart import chart
    from flask_ploints.delivery_log._query import Filters

    now = time.time()
    for account, outcome in [("acme", "processed"), ("ACME", "failed"), ("acme ", "failed")]:
        raw = json.dumps(build_event("points.earned", id=f"evt_{outcome}")).encode()
        any_log.record(outcome, name="ploints", event=parse_event(raw, account), received_at=now)
    for accounts, processed, failed in [
        (["acme"], 1, 0),
        (["ACME"], 0, 1),
        (["ACME", "acme "], 0, 2),
    ]:
        totals = chart(any_log, Filters(accounts=accounts), now=now + 1).totals
        assert (totals["processed"], totals["failed"]) == (processed, failed), accounts


def test_the_search_text_of_a_large_payload_is_cut(any_log: DeliveryLog) -> None:
    from flask_ploints.delivery_log._table import MAX_SEARCH

    # 53 kB of UTF-8, within MariaDB's BLOB for the payload.
    note = "\U0001f4a5" * 12_000 + "x" * 5_000
    data = {"email": "Big@Example.com", "note": note, "tail": "unfound"}
    body = build_event("points.earned", data, id="evt_big")
    raw = json.dumps(body, ensure_ascii=False).encode()
    any_log.record("processed", name="ploints", event=parse_event(raw))
    assert [row.event_id for row in any_log.recent(q="big@example.com")] == ["evt_big"]
    assert any_log.recent(q="unfound") == []
    with any_log.engine.connect() as connection:
        kept = connection.execute(sa.select(any_log.table.c.search)).scalar_one()
    assert len(kept) == MAX_SEARCH
