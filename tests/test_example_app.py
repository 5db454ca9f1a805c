"""The example app handles all seven types, once each, through the plugin's
fixture.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from example_app import create_app
from flask_ploints import EVENT_TYPES
from flask_ploints.testing import PlointsClient


def _config(tmp_path: Path, **extra: t.Any) -> dict[str, t.Any]:
    ploints = f"sqlite:///{tmp_path / 'ploints.sqlite3'}"
    return {
        "DATABASE": str(tmp_path / "loyalty.sqlite3"),
        "TESTING": True,
        "PLOINTS_DEDUPE_STORE": ploints,
        "PLOINTS_DELIVERY_LOG": ploints,
        **extra,
    }


@pytest.fixture
def example(tmp_path: Path) -> Flask:
    return create_app(_config(tmp_path))


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


def test_business_level_idempotence_survives_a_forgetful_store(tmp_path: Path) -> None:
    app = create_app(
        {
            "DATABASE": str(tmp_path / "loyalty.sqlite3"),
            "TESTING": True,
            "PLOINTS_DEDUPE_STORE": None,
        }
    )
    client = PlointsClient(app)
    client.send("points.earned", {"customerEmail": "a@example.com", "amount": 5}, id="evt_1")
    client.send("points.earned", {"customerEmail": "a@example.com", "amount": 5}, id="evt_1")
    assert _customers(app)["a@example.com"]["balance"] == 5


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
