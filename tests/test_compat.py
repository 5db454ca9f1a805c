"""The endpoint in real apps that use other common extensions: deliveries
get through, and the app's own routes stay protected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect
from werkzeug.test import TestResponse

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints.samples import build_event
from flask_ploints.signature import sign

from .support import SECRET

URL = "/webhooks/ploints"
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


# Optional packages stay unimported


def test_optional_packages_are_not_imported() -> None:
    script = (
        "import sys, json\n"
        "from flask import Flask\n"
        "from flask_ploints import PlointsWebhooks\n"
        "from flask_ploints.samples import build_event\n"
        "from flask_ploints.signature import sign\n"
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
