"""The example app handles all seven types, once each, through the plugin's
fixture; its handlers' writes commit with the event's dedupe record, and its
welcome email goes out once the event is committed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import typing as t
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from example_app import create_app
from example_app.loyalty import Customer
from example_app.loyalty import db
from flask_ploints import EVENT_TYPES
from flask_ploints import Event
from flask_ploints._state import receiver_for
from flask_ploints.testing import PlointsClient


def _config(tmp_path: Path, **extra: t.Any) -> dict[str, t.Any]:
    return {
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'loyalty.sqlite3'}",
        "TESTING": True,
        **extra,
    }


@pytest.fixture
def example(tmp_path: Path) -> t.Iterator[Flask]:
    app = create_app(_config(tmp_path))
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def _customers(app: Flask) -> dict[str, dict[str, t.Any]]:
    return {row["email"]: row for row in app.test_client().get("/customers").get_json()}


def test_every_type_updates_the_back_office_once(example: Flask) -> None:
    client = PlointsClient(example)
    for number, event_type in enumerate(EVENT_TYPES):
        assert client.send(event_type, id=f"evt_{number}").status_code == 200
    assert client.send("points.earned", id="evt_0").get_json() == {
        "received": True,
        "duplicate": True,
    }
    customers = _customers(example)
    assert customers["jane@example.com"]["balance"] == 30
    assert customers["jane@example.com"]["tier"] == "Gold"
    assert customers["sam@example.com"]["name"] == "Sam Lee"
    assert customers["ana@example.com"]["activity"] == "campaign.conversion: spring-referral"
    assert "badge: Early Bird" in customers["jane@example.com"]["activity"]


def _emails(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("welcome email sent")
    ]


def test_the_dedupe_record_is_in_the_apps_database(example: Flask) -> None:
    client = PlointsClient(example)
    client.send("points.earned", {"customerEmail": "a@example.com", "amount": 5}, id="evt_1")
    store = example.extensions["ploints"]["ploints"].store
    with example.app_context():
        stored = store.get("evt_1")
        assert stored is not None
        assert stored.status == "done"
        assert store.session.get_bind().url == example.extensions["sqlalchemy"].engine.url


def test_a_failing_handler_leaves_nothing_half_written(
    example: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    # An on_any handler runs after every handler of the type, so the
    # example's own handler has written the customer when this one raises;
    # the whole event is rolled back.
    seen: list[bool] = []
    broken = [True]

    def fail_last(event: Event) -> None:
        seen.append(db.session.get(Customer, event.data["customerEmail"]) is not None)
        if broken[0]:
            raise RuntimeError("broke after the customer was written")

    receiver_for(example).handlers.connect_any(fail_last)
    caplog.set_level(logging.INFO, "example_app")
    client = PlointsClient(example)
    data = {"customerEmail": "lee@example.com", "name": "Lee Chan"}
    assert client.send("customer.created", data, id="evt_new").status_code == 500
    assert client.send("customer.created", data, id="evt_new").status_code == 500
    assert seen == [True, True]
    assert _customers(example) == {}
    assert _emails(caplog) == []
    # The sender's next retry runs the fixed handlers, once.
    broken[0] = False
    assert client.send("customer.created", data, id="evt_new").get_json() == {"received": True}
    assert client.send("customer.created", data, id="evt_new").get_json() == {
        "received": True,
        "duplicate": True,
    }
    assert seen == [True, True, True]
    assert _customers(example)["lee@example.com"]["activity"] == "joined: Lee Chan"
    assert _emails(caplog) == ["welcome email sent to lee@example.com (Lee Chan)"]


def test_pages_show_customers_and_deliveries(example: Flask) -> None:
    PlointsClient(example).send("customer.created", id="evt_page")
    client = example.test_client()
    page = client.get("/")
    assert page.status_code == 200
    assert b"sam@example.com" in page.data
    assert b'href="/ploints/deliveries"' in page.data
    log = client.get("/ploints/deliveries")
    assert log.status_code == 200
    assert b"evt_page" in log.data


def test_delivery_log_is_for_this_machine_only(example: Flask) -> None:
    response = example.test_client().get(
        "/ploints/deliveries", environ_base={"REMOTE_ADDR": "203.0.113.9"}
    )
    assert response.status_code == 403


def test_forged_request_is_refused_over_http(example: Flask) -> None:
    # The run command's forger runs in the example's own virtualenv, which
    # has no test extras: it must not need pytest.
    server = make_server("127.0.0.1", 0, example, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/webhooks/ploints"
    script = (
        "import runpy, sys; sys.modules['pytest'] = None; sys.argv = ['forge', sys.argv[1]];"
        " runpy.run_module('example_app.forge', run_name='__main__')"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parent.parent,
        )
    finally:
        server.shutdown()
        thread.join()
    assert (result.returncode, result.stdout) == (0, '401 {"error": "invalid signature"}\n')


def test_an_older_tier_change_delivered_late_keeps_the_newer_tier(example: Flask) -> None:
    client = PlointsClient(example)
    now = int(time.time())
    email = "jane@example.com"

    def change(tier: str, seconds_ago: int) -> int:
        data = {"customerEmail": email, "previousTier": "Bronze", "newTier": tier}
        moment = datetime.fromtimestamp(now - seconds_ago, tz=UTC)
        return client.send("customer.tier_changed", data, timestamp=moment).status_code

    assert change("Gold", 60) == 200
    # Silver's first delivery failed an hour ago; its retry arrives now.
    assert change("Silver", 3600) == 200
    assert _customers(example)[email]["tier"] == "Gold"
