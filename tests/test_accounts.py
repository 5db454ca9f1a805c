"""One endpoint for many Ploints accounts: ``/webhooks/ploints/<account>``
with a secret lookup, in sync dispatch and on a real Celery worker.

What the tests show:

* ``test_each_account_is_verified_with_its_own_secrets``: two accounts with
  their own secrets on one URL rule are processed, a body signed with the
  other account's secret is ``401``, and handlers see ``event.account``.
* ``test_an_unknown_account_is_404_before_the_body_is_read``: the lookup's
  ``None`` (or a name no account can have) answers a JSON ``404`` without a
  single read of ``wsgi.input``; a known account reads it.
* ``test_a_failing_lookup_is_503``: a lookup that raises or returns junk
  answers ``503`` with ``Retry-After``, unread, with ``SecretLookupError``
  logged.
* ``test_the_lookup_is_called_once_per_delivery``: once for every answer
  that needs a secret, never for one that does not.
* ``test_the_same_id_from_two_accounts_is_two_events`` and
  ``test_dedupe_keys_are_per_account_in_a_shared_store`` (Redis,
  PostgreSQL; two apps on one store, as two processes).
* ``test_rotation_of_one_account`` leaves the other account alone;
  ``test_a_changed_single_secret_is_used_at_once`` (the checked secrets the
  endpoint keeps follow the lookup's answer, junk is never kept);
  ``test_many_threads_many_accounts``: 16 threads on a threaded server, 8
  accounts, each event twice and once with another account's secret, the
  kept secrets emptied over and over: each event runs once.
* ``test_event_account_is_none_for_an_endpoint_of_one``.
* ``test_config_errors_name_the_keys``.
* ``test_the_test_client_posts_for_an_account`` and the pytest plugin's
  ``ploints_client`` (``test_the_plugin_posts_for_an_account``).
* ``test_failed_and_replay_of_an_account`` (a failed re-run, listed with its
  account, replayed with ``--account``) and
  ``test_send_and_simulate_for_an_account`` (``send``, ``simulate``, ``sign``).
* ``test_two_accounts_on_a_celery_worker`` and
  ``test_a_failed_event_of_an_account_replayed_on_celery``: the same on a
  real worker (RabbitMQ), which verifies each task's proof with the
  account's own secrets and refuses one signed with another account's.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import threading
import typing as t
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.datastructures import Headers
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder
from werkzeug.test import TestResponse

from flask_ploints import ConfigError
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import SecretLookupError
from flask_ploints import accounts
from flask_ploints.celery import TASK_NAME
from flask_ploints.cli import ploints
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import rerun
from flask_ploints.signature import SIGNATURE_HEADER
from flask_ploints.signature import sign
from flask_ploints.state import receiver_for
from flask_ploints.stores import InspectableStore
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .accounts_app import Ledger
from .accounts_app import create_app as create_celery_app
from .celery_support import delete_queue
from .support import build_app
from .test_celery import Workers
from .test_celery import _until

URL = "/webhooks/ploints/<account>"
#: The workers' pool: a prefork parent reads the broker while its child
#: works, where a solo worker given several messages at once can leave the
#: next one waiting up to 10 s in its event loop (Celery 5.7), 20 s a test.
POOL = "prefork"


class Lookup:
    """A secret lookup over a dict that counts its calls."""

    def __init__(self, secrets: dict[str, str | list[str]]) -> None:
        self.secrets = secrets
        self.calls: list[str] = []
        self.error: Exception | None = None

    def __call__(self, account: str) -> str | list[str] | None:
        self.calls.append(account)
        if self.error is not None:
            raise self.error
        return self.secrets.get(account)


class Shop:
    """An app with one endpoint for many accounts; its handler records
    (account, id) and fails while ``broken``.
    """

    def __init__(self, lookup: t.Callable[[str], t.Any], **config: t.Any) -> None:
        self.app = Flask("ploints_accounts")
        self.app.testing = True
        self.app.config.update(config)
        self.webhooks = PlointsWebhooks(self.app, url=URL, secret=lookup)
        self.seen: list[tuple[str | None, str]] = []
        self.broken = False

        @self.webhooks.on_any
        def record(event: Event) -> None:
            if self.broken:
                raise RuntimeError(f"boom on {event.account}/{event.id}")
            self.seen.append((event.account, event.id))

    def post(
        self, account: str, secret: str, event_id: str = "evt_1", body: bytes | None = None
    ) -> TestResponse:
        """Post an event signed with ``secret`` to ``account``'s URL."""
        if body is None:
            body = json.dumps(build_event("points.earned", id=event_id)).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)}
        return self.app.test_client().post(
            f"/webhooks/ploints/{account}", data=body, headers=headers
        )


def _processed(response: TestResponse) -> None:
    assert (response.status_code, response.get_json()) == (200, {"received": True})


def _duplicate(response: TestResponse) -> None:
    assert (response.status_code, response.get_json()) == (
        200,
        {"received": True, "duplicate": True},
    )


def _rejected(response: TestResponse) -> None:
    assert (response.status_code, response.get_json()) == (401, {"error": "invalid signature"})


def test_each_account_is_verified_with_its_own_secrets() -> None:
    shop = Shop(Lookup({"m1": "whsec_m1", "m2": "whsec_m2"}))
    _processed(shop.post("m1", "whsec_m1", "evt_a"))
    _processed(shop.post("m2", "whsec_m2", "evt_b"))
    _rejected(shop.post("m1", "whsec_m2", "evt_c"))
    _rejected(shop.post("m2", "whsec_m1", "evt_d"))
    assert shop.seen == [("m1", "evt_a"), ("m2", "evt_b")]


class Watched:
    """A ``wsgi.input`` that records every read of it (werkzeug's test
    client itself only asks where it stands: ``tell``, ``seek``).
    """

    def __init__(self, body: bytes) -> None:
        self._body = io.BytesIO(body)
        self.used: list[str] = []

    def __getattr__(self, name: str) -> t.Any:
        if name.startswith("read") or name == "__iter__":
            self.used.append(name)
        return getattr(self._body, name)


def _post_watched(app: Flask, account: str, secret: str) -> tuple[TestResponse, Watched]:
    body = json.dumps(build_event("points.earned", id="evt_w")).encode()
    headers = Headers({"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)})
    environ = EnvironBuilder(
        path=f"/webhooks/ploints/{account}", method="POST", data=body, headers=headers
    ).get_environ()
    watched = Watched(body)
    environ["wsgi.input"] = watched
    return app.test_client().open(environ), watched


def test_an_unknown_account_is_404_before_the_body_is_read() -> None:
    lookup = Lookup({"m1": "whsec_m1"})
    shop = Shop(lookup)
    response, watched = _post_watched(shop.app, "m9", "whsec_m1")
    assert (response.status_code, response.get_json()) == (404, {"error": "unknown account"})
    assert watched.used == []
    assert lookup.calls == ["m9"]
    # A name no account can have is unknown without asking the lookup.
    response, watched = _post_watched(shop.app, "m" * 129, "whsec_m1")
    assert (response.status_code, watched.used, lookup.calls) == (404, [], ["m9"])
    # The same request for a known account reads the body.
    response, watched = _post_watched(shop.app, "m1", "whsec_m1")
    _processed(response)
    assert "read" in watched.used
    assert shop.seen == [("m1", "evt_w")]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (RuntimeError("vault down"), "the secret lookup raised RuntimeError for account 'm1'"),
        (42, "the secret lookup returned a int for account 'm1'"),
        ([], "the secret lookup returned a list for account 'm1'"),
        (["whsec_ok", 7], "the secret lookup returned a list for account 'm1'"),
        ("  ", "the secret lookup returned a str for account 'm1'"),
    ],
)
def test_a_failing_lookup_is_503(
    answer: object, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    def lookup(account: str) -> t.Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    shop = Shop(lookup)
    with caplog.at_level(logging.ERROR, "flask_ploints"):
        response, watched = _post_watched(shop.app, "m1", "whsec_m1")
    assert (response.status_code, response.get_json()) == (
        503,
        {"error": "secret lookup unavailable"},
    )
    assert response.headers["Retry-After"] == "60"
    assert watched.used == []
    assert shop.seen == []
    [record] = [r for r in caplog.records if r.name == "flask_ploints"]
    assert record.getMessage() == "rejected a delivery: the secret lookup failed"
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, SecretLookupError)
    assert str(error).startswith(message)


def test_the_lookup_is_called_once_per_delivery() -> None:
    lookup = Lookup({"m1": "whsec_m1"})
    shop = Shop(lookup)
    _processed(shop.post("m1", "whsec_m1", "evt_1"))
    assert lookup.calls == ["m1"]
    _duplicate(shop.post("m1", "whsec_m1", "evt_1"))
    _rejected(shop.post("m1", "whsec_other", "evt_2"))
    garbage = shop.post("m1", "whsec_m1", body=b'["signed", "not an event"]')
    assert garbage.status_code == 400
    assert lookup.calls == ["m1"] * 4
    # Answers that need no secret do not ask for one.
    assert shop.app.test_client().get("/webhooks/ploints/m1").status_code == 405
    unsupported = shop.app.test_client().post("/webhooks/ploints/m1", data=b"x")
    assert unsupported.status_code == 415
    assert lookup.calls == ["m1"] * 4


def test_the_same_id_from_two_accounts_is_two_events() -> None:
    shop = Shop(Lookup({"m1": "whsec_m1", "m2": "whsec_m2"}))
    _processed(shop.post("m1", "whsec_m1", "evt_same"))
    _processed(shop.post("m2", "whsec_m2", "evt_same"))
    _duplicate(shop.post("m1", "whsec_m1", "evt_same"))
    _duplicate(shop.post("m2", "whsec_m2", "evt_same"))
    assert shop.seen == [("m1", "evt_same"), ("m2", "evt_same")]


@pytest.fixture(params=["redis", "postgres"])
def shared_store(request: pytest.FixtureRequest, unique: str) -> t.Iterator[dict[str, t.Any]]:
    """The config of a store that two apps share, as two processes would."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        yield {"PLOINTS_DEDUPE_STORE": url, "PLOINTS_REDIS_PREFIX": f"{unique}:"}
        from .celery_app import Recorder

        Recorder(url, unique).forget()
        return
    url = request.getfixturevalue("postgres_url")
    yield {"PLOINTS_DEDUPE_STORE": url, "PLOINTS_SQL_TABLE": unique}
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS "{unique}"'))
    engine.dispose()


def test_dedupe_keys_are_per_account_in_a_shared_store(shared_store: dict[str, t.Any]) -> None:
    lookup = Lookup({"m1": "whsec_m1", "m2": "whsec_m2"})
    first, second = Shop(lookup, **shared_store), Shop(lookup, **shared_store)
    _processed(first.post("m1", "whsec_m1", "evt_x"))
    _processed(second.post("m2", "whsec_m2", "evt_x"))
    _duplicate(second.post("m1", "whsec_m1", "evt_x"))
    _duplicate(first.post("m2", "whsec_m2", "evt_x"))
    assert (first.seen, second.seen) == ([("m1", "evt_x")], [("m2", "evt_x")])
    receiver = receiver_for(first.app)
    store = receiver.store
    assert isinstance(store, InspectableStore)
    namespace = receiver.processor.namespace
    for account in ("m1", "m2"):
        stored = store.get(namespace.key("evt_x", account))
        assert stored is not None
        assert stored.status == "done"
    assert store.get(namespace.key("evt_x")) is None
    for shop in (first, second):
        used = receiver_for(shop.app).store
        closing = getattr(used, "close", None)
        if closing is not None:
            closing()
        engine = getattr(used, "engine", None)
        if engine is not None:
            engine.dispose()


def test_rotation_of_one_account() -> None:
    lookup = Lookup({"m1": ["whsec_m1_new", "whsec_m1_old"], "m2": "whsec_m2"})
    shop = Shop(lookup)
    _processed(shop.post("m1", "whsec_m1_old", "evt_1"))
    _processed(shop.post("m1", "whsec_m1_new", "evt_2"))
    _processed(shop.post("m2", "whsec_m2", "evt_3"))
    _rejected(shop.post("m2", "whsec_m1_new", "evt_4"))
    _rejected(shop.post("m2", "whsec_m1_old", "evt_5"))
    _rejected(shop.post("m1", "whsec_m2", "evt_6"))
    # The test client signs with the current secret, the first.
    _processed(PlointsClient(shop.app).send("points.earned", id="evt_7", account="m1"))
    # Ploints signs with the new one now: the old one goes.
    lookup.secrets["m1"] = "whsec_m1_new"
    _rejected(shop.post("m1", "whsec_m1_old", "evt_8"))
    _processed(shop.post("m1", "whsec_m1_new", "evt_9"))
    assert shop.seen == [
        ("m1", "evt_1"),
        ("m1", "evt_2"),
        ("m2", "evt_3"),
        ("m1", "evt_7"),
        ("m1", "evt_9"),
    ]


def test_a_changed_single_secret_is_used_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Single secrets are kept checked and encoded by their value: a new
    # value is a new entry, and junk is refused every time, never kept.
    monkeypatch.setattr(accounts, "_CHECKED_SECRETS", 2)
    lookup = Lookup({"m1": "whsec_m1_a", "m2": "whsec_m2"})
    shop = Shop(lookup)
    _processed(shop.post("m1", "whsec_m1_a", "evt_1"))
    _processed(shop.post("m2", "whsec_m2", "evt_2"))
    lookup.secrets["m1"] = "whsec_m1_b"
    _rejected(shop.post("m1", "whsec_m1_a", "evt_3"))
    _processed(shop.post("m1", "whsec_m1_b", "evt_4"))
    _processed(shop.post("m2", "whsec_m2", "evt_5"))
    lookup.secrets["m2"] = " "
    assert shop.post("m2", "whsec_m2", "evt_6").status_code == 503
    assert shop.post("m2", "whsec_m2", "evt_7").status_code == 503
    lookup.secrets["m2"] = "whsec_m2"
    _processed(shop.post("m2", "whsec_m2", "evt_8"))
    assert shop.seen == [
        ("m1", "evt_1"),
        ("m2", "evt_2"),
        ("m1", "evt_4"),
        ("m2", "evt_5"),
        ("m2", "evt_8"),
    ]


def test_many_threads_many_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real sockets, a threaded server, and the kept secrets emptied over
    # and over while other threads read them.
    monkeypatch.setattr(accounts, "_CHECKED_SECRETS", 3)
    secrets = {f"m{number}": f"whsec_m{number}" for number in range(8)}
    shop = Shop(Lookup(dict(secrets)))
    server = make_server("127.0.0.1", 0, shop.app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    answers: Counter[tuple[int, str]] = Counter()
    lock = threading.Lock()

    def deliver(worker: int) -> None:
        for number in range(25):
            account = f"m{(worker + number) % 8}"
            body = json.dumps(build_event("points.earned", id=f"evt_{worker}_{number}")).encode()
            # Each event twice, and once signed with the next account's secret.
            for secret in (
                secrets[account],
                secrets[account],
                f"whsec_m{(worker + number + 1) % 8}",
            ):
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                try:
                    connection.request(
                        "POST",
                        f"/webhooks/ploints/{account}",
                        body,
                        {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)},
                    )
                    response = connection.getresponse()
                    answer = (response.status, response.read().decode())
                finally:
                    connection.close()
                with lock:
                    answers[answer] += 1

    try:
        workers = [threading.Thread(target=deliver, args=(worker,)) for worker in range(16)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    finally:
        server.shutdown()
        serving.join(5)
    assert answers == {
        (200, '{"received": true}\n'): 400,
        (200, '{"received": true, "duplicate": true}\n'): 400,
        (401, '{"error": "invalid signature"}\n'): 400,
    }
    assert sorted(shop.seen) == sorted(
        (f"m{(worker + number) % 8}", f"evt_{worker}_{number}")
        for worker in range(16)
        for number in range(25)
    )


def test_event_account_is_none_for_an_endpoint_of_one() -> None:
    app, webhooks = build_app()
    seen: list[str | None] = []
    webhooks.on_any(lambda event: seen.append(event.account))
    client = PlointsClient(app)
    _processed(client.send("points.earned", id="evt_1"))
    assert seen == [None]
    with pytest.raises(ValueError) as raised:
        client.send("points.earned", id="evt_2", account="m1")
    assert str(raised.value) == (
        "PlointsWebhooks 'ploints' serves one account: its URL '/webhooks/ploints' has no <account>"
    )
    assert seen == [None]


def _lookup(account: str) -> str | None:
    return None


@pytest.mark.parametrize("through", ["arguments", "config"])
def test_config_errors_name_the_keys(through: str) -> None:
    def register(url: str, secret: object) -> None:
        app = Flask("ploints_accounts")
        if through == "config":
            app.config.update(PLOINTS_WEBHOOK_URL=url, PLOINTS_WEBHOOK_SECRET=secret)
            PlointsWebhooks(app)
        else:
            PlointsWebhooks(app, url=url, secret=secret)

    with pytest.raises(ConfigError) as raised:
        register("/webhooks/ploints", _lookup)
    assert str(raised.value) == (
        "PLOINTS_WEBHOOK_SECRET is a lookup function, so PLOINTS_WEBHOOK_URL must have an"
        " <account> variable (such as '/webhooks/ploints/<account>'), not '/webhooks/ploints'"
    )
    with pytest.raises(ConfigError) as raised:
        register(URL, "whsec_one")
    assert str(raised.value) == (
        "PLOINTS_WEBHOOK_URL '/webhooks/ploints/<account>' has an <account> variable, so"
        " PLOINTS_WEBHOOK_SECRET must be a function that returns an account's secret (or None"
        " for an unknown one)"
    )


def test_the_test_client_posts_for_an_account() -> None:
    lookup = Lookup({"m1": "whsec_m1", "m2": ["whsec_m2_new", "whsec_m2_old"]})
    shop = Shop(lookup)
    client = PlointsClient(shop.app)
    assert (client.url, client.secret) == (URL, None)
    _processed(client.send("points.earned", id="evt_1", account="m1"))
    _processed(client.post(build_event("points.earned", id="evt_2"), account="m2"))
    # Once to sign, once to verify.
    assert lookup.calls == ["m1", "m1", "m2", "m2"]
    _rejected(
        client.post(build_event("points.earned", id="evt_3"), signature="0" * 64, account="m2")
    )
    assert lookup.calls == ["m1", "m1", "m2", "m2", "m2"]
    with pytest.raises(ValueError) as raised:
        client.send("points.earned", id="evt_4")
    assert str(raised.value) == (
        "PlointsWebhooks 'ploints' serves many accounts ('/webhooks/ploints/<account>'):"
        " give the account"
    )
    with pytest.raises(ValueError) as raised:
        client.send("points.earned", id="evt_5", account="m9")
    assert str(raised.value) == "the secret lookup does not know account 'm9'"
    assert shop.seen == [("m1", "evt_1"), ("m2", "evt_2")]


PLUGIN_CONFTEST = """
import pytest
from flask import Flask
from flask_ploints import PlointsWebhooks

SECRETS = {"m1": "whsec_m1", "m2": "whsec_m2"}

@pytest.fixture
def seen():
    return []

@pytest.fixture
def app(seen):
    app = Flask("plugin_accounts")
    app.testing = True
    webhooks = PlointsWebhooks(app, url="/hooks/<account>", secret=SECRETS.get)
    webhooks.on_any(lambda event: seen.append((event.account, event.id)))
    return app
"""


def test_the_plugin_posts_for_an_account(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process of its own (a warning of an earlier test's garbage would
    # fail it in process), on this checkout's package.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    pytester.makeconftest(PLUGIN_CONFTEST)
    pytester.makepyfile(
        """
        def test_accounts(ploints_client, seen):
            first = ploints_client.send("points.earned", id="evt_1", account="m1")
            second = ploints_client.send("points.earned", id="evt_1", account="m2")
            assert (first.status_code, second.status_code) == (200, 200)
            assert seen == [("m1", "evt_1"), ("m2", "evt_1")]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def _run(app: Flask, *args: str) -> t.Any:
    return app.test_cli_runner().invoke(ploints, list(args))


def test_failed_and_replay_of_an_account(redis_url: str, unique: str) -> None:
    from .celery_app import Recorder

    shop = Shop(
        Lookup({"m1": "whsec_m1", "m2": "whsec_m2"}),
        PLOINTS_DEDUPE_STORE=redis_url,
        PLOINTS_REDIS_PREFIX=f"{unique}:",
    )
    try:
        shop.broken = True
        response = shop.post("m1", "whsec_m1", "evt_r")
        assert (response.status_code, response.get_json()) == (500, {"error": "handler failed"})
        # A delivery that fails is released for the sender's retry; a re-run
        # that fails stays failed in the store.
        body = json.dumps(build_event("points.earned", id="evt_r")).encode()
        with pytest.raises(ValueError) as raised:
            rerun(shop.app, body)
        assert str(raised.value) == (
            "PlointsWebhooks 'ploints' serves many accounts: give the event's account"
        )
        assert rerun(shop.app, body, account="m1") is ReplayOutcome.FAILED
        shop.broken = False
        _processed(shop.post("m2", "whsec_m2", "evt_r"))
        result = _run(shop.app, "failed")
        assert result.exit_code == 0
        assert re.fullmatch(
            r"evt_r  \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  attempts=1  account=m1"
            r"  RuntimeError: boom on m1/evt_r\n",
            result.output,
        ), result.output
        result = _run(shop.app, "replay", "evt_r")
        assert (result.exit_code, result.output) == (
            1,
            "Error: PlointsWebhooks 'ploints' serves many accounts: give the event's account\n",
        )
        result = _run(shop.app, "replay", "evt_r", "--account", "m2")
        assert (result.exit_code, result.output) == (
            1,
            "Error: event 'evt_r' is done, not failed\n",
        )
        result = _run(shop.app, "replay", "evt_r", "--account", "m1")
        assert (result.exit_code, result.output) == (0, "evt_r: processed\n")
        assert shop.seen == [("m2", "evt_r"), ("m1", "evt_r")]
        assert _run(shop.app, "failed").output == "no failed events\n"
    finally:
        Recorder(redis_url, unique).forget()


def test_send_and_simulate_for_an_account() -> None:
    lookup = Lookup({"m1": "whsec_m1", "m2": "whsec_m2"})
    shop = Shop(lookup)
    result = _run(shop.app, "send", "points.earned", "--id", "evt_1", "--account", "m1")
    assert (result.exit_code, result.output) == (0, '200 {"received": true}\n')
    result = _run(
        shop.app, "simulate", "points.earned", "--id", "evt_1", "--account", "m2", "--speed", "1e9"
    )
    assert (result.exit_code, result.output) == (
        0,
        'attempt 1 (sender\'s +0 s): 200 {"received": true}\n',
    )
    assert shop.seen == [("m1", "evt_1"), ("m2", "evt_1")]
    # The lookup: once to sign, once to verify.
    assert lookup.calls == ["m1", "m1", "m2", "m2"]
    result = shop.app.test_cli_runner().invoke(ploints, ["sign", "--account", "m2"], input="{}")
    assert (result.exit_code, result.output) == (0, sign(b"{}", "whsec_m2") + "\n")
    for command in ("send", "simulate"):
        result = _run(shop.app, command, "points.earned", "--account", "m9")
        assert (result.exit_code, result.output) == (
            1,
            "Error: --account: the secret lookup does not know account 'm9'\n",
        )
        result = _run(shop.app, command, "points.earned")
        assert (result.exit_code, result.output) == (
            1,
            "Error: --account: PlointsWebhooks 'ploints' serves many accounts"
            " ('/webhooks/ploints/<account>'): give the account\n",
        )
    single = build_app()[0]
    result = _run(single, "send", "points.earned", "--account", "m1")
    assert (result.exit_code, result.output) == (
        1,
        "Error: --account: PlointsWebhooks 'ploints' serves one account: its URL"
        " '/webhooks/ploints' has no <account>\n",
    )
    lookup.error = RuntimeError("vault down")
    result = _run(shop.app, "send", "points.earned", "--account", "m1")
    assert (result.exit_code, result.output) == (
        1,
        "Error: the secret lookup raised RuntimeError for account 'm1'\n",
    )
    assert shop.seen == [("m1", "evt_1"), ("m2", "evt_1")]


# On a real Celery worker.


@pytest.fixture
def ledger(redis_url: str, unique: str) -> t.Iterator[Ledger]:
    ledger = Ledger(redis_url, unique)
    yield ledger
    ledger.forget()
    ledger.close()


@pytest.fixture
def account_workers(
    amqp_url: str, redis_url: str, unique: str, tmp_path: Path, ledger: Ledger
) -> t.Iterator[Workers]:
    workers = Workers(amqp_url, redis_url, unique, tmp_path)
    workers.app_module = "tests.accounts_app:celery"
    yield workers
    workers.stop()
    delete_queue(amqp_url, unique)


def _web_app(workers: Workers) -> t.Iterator[Flask]:
    app = create_celery_app(
        workers.amqp_url, workers.redis_url, workers.namespace, "web", workers.config
    )
    yield app
    receiver = receiver_for(app)
    receiver.dispatcher.close()  # type: ignore[attr-defined]
    receiver.store.client.close()  # type: ignore[attr-defined]


def _queued(response: TestResponse) -> None:
    assert (response.status_code, response.get_json()) == (202, {"received": True, "queued": True})


def _post(app: Flask, account: str, secret: str, event_id: str, **data: t.Any) -> TestResponse:
    body = json.dumps(build_event("points.earned", data or None, id=event_id)).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)}
    return app.test_client().post(f"/webhooks/ploints/{account}", data=body, headers=headers)


def test_two_accounts_on_a_celery_worker(account_workers: Workers, ledger: Ledger) -> None:
    ledger.set_secrets("m1", ["whsec_m1_new", "whsec_m1_old"])
    ledger.set_secrets("m2", "whsec_m2")
    made = _web_app(account_workers)
    app = next(made)
    try:
        # Queued before the worker starts (see tests/test_celery.py).
        _queued(_post(app, "m1", "whsec_m1_old", "evt_same"))
        _queued(_post(app, "m2", "whsec_m2", "evt_same"))
        _queued(_post(app, "m1", "whsec_m1_new", "evt_new"))
        _rejected(_post(app, "m2", "whsec_m1_new", "evt_cross"))
        unknown = _post(app, "m9", "whsec_m2", "evt_unknown")
        assert (unknown.status_code, unknown.get_json()) == (404, {"error": "unknown account"})
        # A task injected into the broker for m1, with a proof under m2's
        # secret: the worker checks it against m1's secrets only.
        forged = json.dumps(build_event("points.earned", id="evt_forged"))
        app.extensions["celery"].send_task(
            TASK_NAME,
            args=("ploints", forged, "forged-token", sign(forged.encode(), "whsec_m2"), "m1"),
            queue=account_workers.namespace,
        )
        # Queued last: once it ran, everything before it has.
        _queued(_post(app, "m2", "whsec_m2", "evt_drain"))
        account_workers.start(POOL)
        _until(
            lambda: "m2/evt_drain" in ledger.count("event_processed"),
            "the worker to process m2/evt_drain",
        )
        # The forged task came on another connection, maybe after the drain.
        _until(
            lambda: "the task carries no proof" in account_workers.output(),
            "the worker to refuse the forged task",
        )
        assert ledger.count("effects") == {
            "worker:m1/evt_same": 1,
            "worker:m2/evt_same": 1,
            "worker:m1/evt_new": 1,
            "worker:m2/evt_drain": 1,
        }
        # Once per delivery at the endpoint (none for a rejected account's
        # body), once per task at the worker, to verify its proof.
        assert ledger.count("lookups") == {
            "web:m1": 2,
            "web:m2": 3,
            "web:m9": 1,
            "worker:m1": 3,
            "worker:m2": 2,
        }
        _duplicate(_post(app, "m1", "whsec_m1_new", "evt_same"))
        _duplicate(_post(app, "m2", "whsec_m2", "evt_same"))
    finally:
        next(made, None)


def test_a_failed_event_of_an_account_replayed_on_celery(
    account_workers: Workers, ledger: Ledger
) -> None:
    ledger.set_secrets("m1", "whsec_m1")
    ledger.set_secrets("m2", "whsec_m2")
    account_workers.config = {"PLOINTS_CELERY_MAX_RETRIES": 0}
    made = _web_app(account_workers)
    app = next(made)
    try:
        _queued(_post(app, "m1", "whsec_m1", "evt_bad", fail=True))
        _queued(_post(app, "m2", "whsec_m2", "evt_bad"))
        account_workers.start(POOL)
        _until(lambda: ledger.count("handler_failed") == {"m1/evt_bad": 1}, "m1/evt_bad to fail")
        _until(lambda: ledger.count("event_processed") == {"m2/evt_bad": 1}, "m2/evt_bad to commit")
        result = _run(app, "failed")
        assert re.fullmatch(
            r"evt_bad  \S+ \S+Z  attempts=1  account=m1  RuntimeError: handler broke on purpose"
            r" on m1/evt_bad\n",
            result.output,
        ), result.output
        ledger.fix()
        result = _run(app, "replay", "evt_bad", "--account", "m1")
        assert (result.exit_code, result.output) == (0, "evt_bad: queued\n")
        _until(
            lambda: ledger.count("event_processed") == {"m1/evt_bad": 1, "m2/evt_bad": 1},
            "the replayed run",
        )
        assert ledger.count("effects") == {"worker:m1/evt_bad": 1, "worker:m2/evt_bad": 1}
        assert ledger.count("starts") == {"m1/evt_bad": 2, "m2/evt_bad": 1}
        assert _run(app, "failed").output == "no failed events\n"
    finally:
        next(made, None)
