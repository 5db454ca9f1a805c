"""The pytest plugin, run in a separate pytest session with pytester."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CONFTEST = """
import pytest
from flask import Flask
from flask_ploints import PlointsWebhooks

webhooks = PlointsWebhooks()
seen = []

@webhooks.on("points.earned")
def award(event):
    seen.append((event.id, event.data["amount"]))

@pytest.fixture
def app():
    app = Flask("user_app")
    app.testing = True
    app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_user"
    webhooks.init_app(app)
    seen.clear()
    return app
"""


def test_ploints_client_fixture_posts_signed_events(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        from conftest import seen

        def test_send(ploints_client):
            response = ploints_client.send("points.earned", {"amount": 5}, id="evt_1")
            assert response.status_code == 200
            assert response.get_json() == {"received": True}
            assert seen == [("evt_1", 5)]

        def test_duplicate(ploints_client):
            ploints_client.send("points.earned", {"amount": 5}, id="evt_1")
            response = ploints_client.send("points.earned", {"amount": 5}, id="evt_1")
            assert response.get_json() == {"received": True, "duplicate": True}
            assert seen == [("evt_1", 5)]

        def test_forged(ploints_client):
            response = ploints_client.post({"id": "x"}, signature="0" * 64)
            assert response.status_code == 401
            assert seen == []

        def test_works_beside_pytest_flask(client, ploints_client):
            assert client.get("/webhooks/ploints").status_code == 405
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_ploints_client_needs_an_app_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_send(ploints_client):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'app' not found*"])


def test_ploints_client_without_init_app_explains(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from flask import Flask

        @pytest.fixture
        def app():
            return Flask("bare")
        """
    )
    pytester.makepyfile(
        """
        def test_send(ploints_client):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*did you forget to call init_app(app)?*"])


# A process where ``import pytest`` fails, as where pytest is not installed.
WITHOUT_PYTEST = """
import sys
sys.modules["pytest"] = None
import json
from flask import Flask
from flask_ploints import PlointsWebhooks
from flask_ploints.testing import FakeClock, PlointsClient, build_event, send_event

app = Flask("no_pytest")
app.testing = True
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_plain"
webhooks = PlointsWebhooks(app)
seen = []
webhooks.on("points.earned")(lambda event: seen.append(event.id))
event = build_event("points.earned", {"amount": 5}, id="evt_1")
first = send_event(app, "points.earned", {"amount": 5}, id="evt_1")
again = PlointsClient(app).send("points.earned", {"amount": 5}, id="evt_1")
print(json.dumps([event["id"], first.status_code, again.get_json(), seen, FakeClock(5.0)()]))
"""


def test_helpers_work_without_pytest() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_PYTEST)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.stderr == ""
    assert completed.returncode == 0
    assert completed.stdout == (
        '["evt_1", 200, {"received": true, "duplicate": true}, ["evt_1"], 5.0]\n'
    )


def test_plugin_is_the_entry_point_module(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_plugin(request):
            plugin = request.config.pluginmanager.get_plugin("ploints")
            assert plugin.__name__ == "flask_ploints.pytest_plugin"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
