"""The endpoint in real apps that use other common extensions: deliveries
get through, and the app's own routes stay protected.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import sentry_sdk
from flask import Flask
from flask import Request
from flask import Response
from flask import request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_login import login_required
from flask_talisman import Talisman
from flask_wtf.csrf import CSRFProtect
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import EnvironBuilder
from werkzeug.test import TestResponse

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints._samples import build_event
from flask_ploints._signature import sign
from flask_ploints.delivery_log import DeliveryLog
from flask_ploints.testing import PlointsClient

from .support import SECRET
from .support import build_app

URL = "/webhooks/ploints"
LOG = "/ploints/deliveries"
HTTPS = "https://localhost"
ROOT = Path(__file__).resolve().parent.parent

Init = t.Callable[[Flask], object]


def _own_app(**config: t.Any) -> Flask:
    """An app with routes of its own for the extensions to protect."""
    app = Flask("ploints_compat")
    app.testing = True
    app.config.update(SECRET_KEY="test-only", PLOINTS_WEBHOOK_SECRET=SECRET, **config)

    @app.post("/form")
    def form() -> str:
        return "saved"

    @app.get("/page")
    def page() -> str:
        return "page"

    return app


def _setup(app: Flask, webhooks: PlointsWebhooks, other: Init, ploints_first: bool) -> None:
    inits: list[Init] = [webhooks.init_app, other]
    for init in inits if ploints_first else reversed(inits):
        init(app)


def _handled(webhooks: PlointsWebhooks) -> list[str]:
    seen: list[str] = []

    @webhooks.on_any
    def record(event: Event) -> None:
        seen.append(event.id)

    return seen


def _body(event_id: str) -> bytes:
    return json.dumps(build_event("points.earned", id=event_id)).encode()


def _deliver(
    app: Flask,
    event_id: str = "evt_1",
    *,
    body: bytes | None = None,
    signature: str | None = None,
    base_url: str = "http://localhost",
    headers: dict[str, str] | None = None,
) -> TestResponse:
    body = _body(event_id) if body is None else body
    sent = {
        "Content-Type": "application/json",
        "X-Ploints-Signature": sign(body, SECRET) if signature is None else signature,
        **(headers or {}),
    }
    return app.test_client().post(URL, data=body, headers=sent, base_url=base_url)


ORDERS = pytest.mark.parametrize(
    "ploints_first", [True, False], ids=["ploints-first", "extension-first"]
)


# Flask-WTF


@ORDERS
def test_csrf_protect_leaves_deliveries_alone(ploints_first: bool) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks()
    handled = _handled(webhooks)
    _setup(app, webhooks, CSRFProtect().init_app, ploints_first)
    response = _deliver(app)
    assert response.status_code == 200
    assert response.get_json() == {"received": True}
    assert handled == ["evt_1"]
    own = app.test_client().post("/form", data={"name": "x"})
    assert own.status_code == 400
    assert b"The CSRF token is missing." in own.data


def _delivery_log_app(tmp_path: Path, ploints_first: bool) -> tuple[Flask, DeliveryLog]:
    app = _own_app(PLOINTS_DELIVERY_LOG_ACCESS=lambda: True)
    log = DeliveryLog.from_url(f"sqlite:///{tmp_path / 'log.db'}")
    app.config["PLOINTS_DELIVERY_LOG"] = log
    webhooks = PlointsWebhooks()

    @webhooks.on("points.earned")
    def fail(event: Event) -> None:
        raise RuntimeError("database is down")

    _setup(app, webhooks, CSRFProtect().init_app, ploints_first)
    return app, log


@ORDERS
def test_csrf_protect_leaves_the_delivery_log_to_its_own_token(
    tmp_path: Path, ploints_first: bool
) -> None:
    app, log = _delivery_log_app(tmp_path, ploints_first)
    assert _deliver(app).status_code == 500
    (failed,) = log.recent()
    browser = app.test_client()
    page = browser.get(f"{LOG}/{failed.id}").get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None
    refused = browser.post(f"{LOG}/{failed.id}/rerun", data={})
    assert refused.status_code == 400
    assert "CSRF token is missing: reload the page" in refused.get_data(as_text=True)
    rerun = browser.post(f"{LOG}/{failed.id}/rerun", data={"csrf_token": match.group(1)})
    assert rerun.status_code == 303
    assert [row.outcome for row in log.recent()] == ["failed", "failed"]
    log.engine.dispose()


# Flask-Limiter


def _limiter() -> Limiter:
    return Limiter(get_remote_address, default_limits=["2 per minute"], storage_uri="memory://")


@ORDERS
def test_limiter_default_limits_leave_deliveries_alone(ploints_first: bool) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks()
    handled = _handled(webhooks)
    _setup(app, webhooks, _limiter().init_app, ploints_first)
    statuses = [_deliver(app, f"evt_{number}").status_code for number in range(20)]
    assert statuses == [200] * 20
    assert len(handled) == 20
    client = app.test_client()
    assert [client.get("/page").status_code for _ in range(3)] == [200, 200, 429]


@ORDERS
def test_limiter_limit_applied_to_the_endpoint_on_purpose(ploints_first: bool) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks()
    limiter = _limiter()
    _setup(app, webhooks, limiter.init_app, ploints_first)
    limiter.limit("5 per minute")(app.blueprints["ploints"])
    statuses = [_deliver(app, f"evt_{number}").status_code for number in range(6)]
    assert statuses == [200] * 5 + [429]


# Reading the body before or after the view


@pytest.mark.parametrize(
    "read",
    [lambda: request.get_data(), lambda: request.get_json()],
    ids=["get_data", "get_json"],
)
def test_before_request_reading_the_body(read: t.Callable[[], t.Any]) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks(app)
    handled = _handled(webhooks)
    seen: list[t.Any] = []

    @app.before_request
    def log_body() -> None:
        seen.append(read())

    body = _body("evt_1")
    response = _deliver(app, body=body)
    assert response.status_code == 200
    assert handled == ["evt_1"]
    assert seen == [body if isinstance(seen[0], bytes) else json.loads(body)]
    forged = _deliver(app, "evt_2", signature="0" * 64)
    assert forged.status_code == 401
    assert handled == ["evt_1"]


def test_after_request_reading_the_body() -> None:
    app = _own_app()
    PlointsWebhooks(app)
    seen: list[bytes] = []

    @app.after_request
    def log_body(response: Response) -> Response:
        seen.append(request.get_data())
        return response

    body = _body("evt_1")
    assert _deliver(app, body=body).status_code == 200
    assert seen == [body]


class _Buffering:
    """Reads the body whole into a ``BytesIO``, as logging middleware does."""

    def __init__(self, wsgi_app: t.Any, seen: list[bytes]) -> None:
        self.wsgi_app = wsgi_app
        self.seen = seen

    def __call__(self, environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        self.seen.append(body)
        environ["wsgi.input"] = io.BytesIO(body)
        return self.wsgi_app(environ, start_response)


class _ReadOnlyStream:
    """A stream of its own with ``read`` only, as instrumenting middleware
    wraps ``wsgi.input``.
    """

    def __init__(self, wrapped: t.IO[bytes], seen: list[bytes]) -> None:
        self.wrapped = wrapped
        self.seen = seen

    def read(self, size: int = -1) -> bytes:
        chunk = self.wrapped.read(size)
        self.seen.append(chunk)
        return chunk


class _Wrapping:
    def __init__(self, wsgi_app: t.Any, seen: list[bytes]) -> None:
        self.wsgi_app = wsgi_app
        self.seen = seen

    def __call__(self, environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        environ["wsgi.input"] = _ReadOnlyStream(environ["wsgi.input"], self.seen)
        return self.wsgi_app(environ, start_response)


@pytest.mark.parametrize("middleware", [_Buffering, _Wrapping], ids=["buffering", "wrapping"])
def test_middleware_wrapping_wsgi_input(middleware: type[t.Any]) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks(app)
    handled = _handled(webhooks)
    seen: list[bytes] = []
    app.wsgi_app = middleware(app.wsgi_app, seen)  # type: ignore[method-assign]
    body = _body("evt_1")
    assert _deliver(app, body=body).status_code == 200
    assert handled == ["evt_1"]
    assert b"".join(seen) == body


def test_app_max_content_length_does_not_apply_to_the_endpoint() -> None:
    # The endpoint has its own limit, PLOINTS_WEBHOOK_MAX_BYTES.
    app = _own_app(MAX_CONTENT_LENGTH=10)
    PlointsWebhooks(app)
    assert _deliver(app).status_code == 200


# Flask-Talisman


@ORDERS
def test_talisman_deliveries_over_https(ploints_first: bool) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks()
    handled = _handled(webhooks)
    _setup(app, webhooks, lambda app: Talisman(app), ploints_first)
    response = _deliver(app, base_url=HTTPS)
    assert response.status_code == 200
    assert response.get_json() == {"received": True}
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in response.headers
    plain = _deliver(app, "evt_2")
    assert plain.status_code == 302
    assert plain.headers["Location"] == f"{HTTPS}{URL}"
    assert handled == ["evt_1"]
    own = app.test_client().get("/page")
    assert own.status_code == 302
    assert own.headers["Location"] == f"{HTTPS}/page"


# Flask-Login


def _login_manager(app: Flask) -> LoginManager:
    manager = LoginManager(app)

    @manager.user_loader
    def load_user(user_id: str) -> None:
        return None

    return manager


@ORDERS
def test_login_manager_leaves_deliveries_alone(ploints_first: bool) -> None:
    app = _own_app()

    @app.get("/account")
    @login_required
    def account() -> str:
        return "account"

    webhooks = PlointsWebhooks()
    handled = _handled(webhooks)
    _setup(app, webhooks, _login_manager, ploints_first)
    assert _deliver(app).status_code == 200
    assert handled == ["evt_1"]
    assert app.test_client().get("/account").status_code == 401


# sentry-sdk


class _ListTransport(Transport):
    """Keeps every envelope instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)


@pytest.fixture
def sentry() -> t.Iterator[_ListTransport]:
    transport = _ListTransport()
    sentry_sdk.init(
        transport=transport,
        # Only what the test is about: the other default integrations patch
        # the standard library for the rest of the process.
        default_integrations=False,
        auto_enabling_integrations=False,
        # An error record is an event, as sentry-sdk 2 made it by default and
        # 3 makes it only when told; no stream of Sentry logs (sentry-sdk 3).
        integrations=[
            FlaskIntegration(),
            LoggingIntegration(level=None, event_level=logging.ERROR),
        ],
        auto_session_tracking=False,
    )
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def _sentry_events(transport: _ListTransport) -> list[dict[str, t.Any]]:
    sentry_sdk.flush()
    return [
        item.payload.json
        for envelope in transport.envelopes
        for item in envelope.items
        if item.type == "event" and item.payload.json is not None
    ]


def test_sentry_captures_a_handler_failure_once(sentry: _ListTransport) -> None:
    app = _own_app()
    webhooks = PlointsWebhooks(app)

    @webhooks.on("points.earned")
    def fail(event: Event) -> None:
        raise RuntimeError("database is down")

    body = _body("evt_1")
    response = _deliver(app, body=body)
    assert response.status_code == 500
    assert response.get_json() == {"error": "handler failed"}
    [event] = _sentry_events(sentry)
    [exception] = event["exception"]["values"]
    assert (exception["type"], exception["value"]) == ("RuntimeError", "database is down")
    assert event["logger"] == "flask_ploints"
    # Sentry read the body after the view, and got the verified one.
    assert event["request"]["data"] == json.loads(body)


def test_sentry_sends_nothing_for_a_delivery(sentry: _ListTransport) -> None:
    app = _own_app()
    PlointsWebhooks(app)
    assert _deliver(app).status_code == 200
    assert _deliver(app, "evt_2", signature="0" * 64).status_code == 401
    sentry_sdk.flush()
    assert sentry.envelopes == []


# werkzeug's ProxyFix


def test_proxy_fix_with_https_required() -> None:
    app = _own_app(PLOINTS_REQUIRE_HTTPS=True)
    PlointsWebhooks(app)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1)  # type: ignore[method-assign]
    assert _deliver(app, headers={"X-Forwarded-Proto": "https"}).status_code == 200
    plain = _deliver(app, "evt_2")
    assert plain.status_code == 403
    assert plain.get_json() == {"error": "HTTPS required"}


# All of them


def test_kitchen_sink(sentry: _ListTransport) -> None:
    app = _own_app(PLOINTS_REQUIRE_HTTPS=True)

    @app.get("/account")
    @login_required
    def account() -> str:
        return "account"

    CSRFProtect(app)
    _limiter().init_app(app)
    webhooks = PlointsWebhooks(app)
    handled = _handled(webhooks)
    Talisman(app)
    _login_manager(app)
    logged: list[bytes] = []

    @app.before_request
    def log_body() -> None:
        logged.append(request.get_data())

    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1)  # type: ignore[method-assign]
    proxied = {"X-Forwarded-Proto": "https"}

    body = _body("evt_0")
    first = _deliver(app, body=body, headers=proxied)
    assert first.status_code == 200
    assert first.get_json() == {"received": True}
    assert "Strict-Transport-Security" in first.headers
    assert logged == [body]
    statuses = [_deliver(app, f"evt_{n}", headers=proxied).status_code for n in range(1, 20)]
    assert statuses == [200] * 19
    duplicate = _deliver(app, body=body, headers=proxied)
    assert duplicate.status_code == 200
    assert duplicate.get_json() == {"received": True, "duplicate": True}
    forged = _deliver(app, "evt_forged", signature="0" * 64, headers=proxied)
    assert forged.status_code == 401
    assert handled == [f"evt_{n}" for n in range(20)]

    client = app.test_client()
    form = client.post("/form", data={"name": "x"}, base_url=HTTPS)
    assert form.status_code == 400
    assert b"The CSRF token is missing." in form.data
    assert client.get("/account", base_url=HTTPS).status_code == 401
    assert client.get("/account").status_code == 302
    pages = [client.get("/page", base_url=HTTPS).status_code for _ in range(3)]
    assert pages == [200, 200, 429]
    assert _sentry_events(sentry) == []


# Optional packages stay unimported


def test_optional_packages_are_not_imported() -> None:
    script = (
        "import sys, json\n"
        "from flask import Flask\n"
        "from flask_ploints import PlointsWebhooks\n"
        "from flask_ploints._samples import build_event\n"
        "from flask_ploints._signature import sign\n"
        "app = Flask('bare')\n"
        "app.testing = True\n"
        f"app.config['PLOINTS_WEBHOOK_SECRET'] = {SECRET!r}\n"
        "PlointsWebhooks(app)\n"
        "body = json.dumps(build_event('points.earned')).encode()\n"
        "headers = {'Content-Type': 'application/json',"
        f" 'X-Ploints-Signature': sign(body, {SECRET!r})}}\n"
        f"assert app.test_client().post({URL!r}, data=body, headers=headers).status_code == 200\n"
        "optional = ('flask_wtf', 'flask_limiter', 'flask_talisman', 'flask_login', 'sentry_sdk')\n"
        "print(sorted(name for name in optional if name in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout == "[]\n"


def test_werkzeug_keeps_its_stream_in_the_request_dict() -> None:
    """flask_ploints._body reads ``wsgi.input`` itself only while nothing
    made werkzeug's ``Request.stream``; it tells by that cached property
    being in the request's ``__dict__``. If werkzeug stops keeping it there,
    this fails before any delivery could be read short.
    """
    raw = Request(EnvironBuilder(method="POST", data=b'{"a": 1}').get_environ())
    assert "stream" not in raw.__dict__
    assert raw.get_data(cache=True) == b'{"a": 1}'
    assert "stream" in raw.__dict__

    parsed = Request(EnvironBuilder(method="POST", json={"a": 1}).get_environ())
    assert parsed.get_json() == {"a": 1}
    assert "stream" in parsed.__dict__

    form = Request(EnvironBuilder(method="POST", data={"a": "1"}).get_environ())
    assert form.form["a"] == "1"
    assert "stream" in form.__dict__


def test_the_body_read_first_by_the_view_is_there_for_later_readers() -> None:
    app, _ = build_app()
    seen: list[bytes] = []

    @app.after_request
    def read_after(response: t.Any) -> t.Any:
        seen.append(request.get_data())
        seen.append(request.get_data())
        return response

    body = json.dumps(build_event("points.earned", id="evt_1")).encode()
    assert PlointsClient(app).post(body).status_code == 200
    assert seen == [body, body]
