"""One endpoint for many Ploints accounts: ``/webhooks/ploints/<account>``
with a secret lookup, in sync dispatch and on a real Celery worker.

What the tests show:

* ``test_each_account_is_verified_with_its_own_secrets``: two accounts with
  their own secrets on one URL rule are processed, a body signed with the
  other account's secret is ``401``, and handlers see ``event.account``.
* ``test_an_unknown_account_is_401_before_the_body_is_read``: the lookup's
  ``None`` (or a name no account can have) answers exactly what a wrong
  signature answers, ``401``, without a single read of ``wsgi.input``; a
  known account reads it.
* ``test_unknown_account_answers_as_a_bad_signature``: status, headers and
  body byte for byte, and the log still says "unknown account".
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
* One account under many spellings: ``test_each_spelling_of_one_account_runs_once``
  (Hypothesis: case, accents, NFC/NFD, trailing spaces, percent-encoding,
  against a lookup that collates as MariaDB does and returns an
  ``Account``: a captured body runs once, one key in the store),
  ``test_bare_secrets_name_the_account_as_the_url_spells_it`` (the
  documented risk), ``test_an_account_names_the_event_logs_and_signals``,
  ``test_a_bad_account_is_503``,
  ``test_the_delivery_log_keeps_the_canonical_name``.
* Converters: ``test_every_converter`` (string, int, uuid, path, float, any
  and a custom one: the lookup gets the converted value, the account is
  its string form), ``test_the_test_client_signs_for_a_converted_account``,
  ``test_a_converted_value_named_by_its_account``.
* The lookup's load: ``test_a_flood_of_unknown_names`` (the docs' cached
  lookup in front of a slow table, a threaded server, 400 made-up names
  from 16 threads: never more lookups at once than the bound, each name
  asked once, the real account never evicted, none of its deliveries lost)
  and ``test_slow_lookups_are_bounded`` (hanging lookups fill the slots; the
  next deliveries are a ``503`` at once, without a call).
* ``test_two_accounts_on_a_celery_worker`` and
  ``test_a_failed_event_of_an_account_replayed_on_celery``: the same on a
  real worker (RabbitMQ), which verifies each task's proof with the
  account's own secrets and refuses one signed with another account's;
  ``test_an_account_under_its_spellings_on_a_celery_worker``: an
  ``Account`` whose canonical name the lookup does not answer for runs on
  the worker, which looks it up by the delivery's URL, on a retry too.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import logging
import re
import threading
import time
import types
import typing as t
import unicodedata
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote
from urllib.parse import unquote

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers
from werkzeug.routing import BaseConverter
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder
from werkzeug.test import TestResponse

from flask_ploints import Account
from flask_ploints import ConfigError
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import SecretLookupError
from flask_ploints import _accounts as accounts
from flask_ploints import signals
from flask_ploints._celery import TASK_NAME
from flask_ploints._cli import ploints
from flask_ploints._signature import SIGNATURE_HEADER
from flask_ploints._signature import sign
from flask_ploints._state import receiver_for
from flask_ploints.delivery_log import DeliveryLog
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import rerun
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

    def __init__(
        self,
        lookup: t.Callable[[t.Any], t.Any],
        url: str = URL,
        converters: dict[str, type[BaseConverter]] | None = None,
        **config: t.Any,
    ) -> None:
        self.app = Flask("ploints_accounts")
        self.app.testing = True
        self.app.config.update(config)
        self.app.url_map.converters.update(converters or {})
        self.webhooks = PlointsWebhooks(self.app, url=url, secret=lookup)
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
        """Post an event signed with ``secret`` to ``account``'s URL
        (``account`` is put in the path as it is: quote it yourself).
        """
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


def test_an_unknown_account_is_401_before_the_body_is_read() -> None:
    lookup = Lookup({"m1": "whsec_m1"})
    shop = Shop(lookup)
    response, watched = _post_watched(shop.app, "m9", "whsec_m1")
    _rejected(response)
    assert watched.used == []
    assert lookup.calls == ["m9"]
    # A name no account can have is unknown without asking the lookup.
    response, watched = _post_watched(shop.app, "m" * 129, "whsec_m1")
    assert (response.status_code, watched.used, lookup.calls) == (401, [], ["m9"])
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


# One account under many spellings, every converter, the lookup's load.


def _collated(value: str) -> str:
    # What a case- and accent-insensitive collation (MariaDB's default,
    # with its PAD SPACE) compares: no case, no accents, no trailing spaces.
    decomposed = unicodedata.normalize("NFKD", value)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.casefold().rstrip(" ")


class CollatedLookup(Lookup):
    """A lookup that finds an account as such a collation does, and names
    it canonically with an :class:`Account` (bare secrets when ``bare``).
    """

    def __init__(self, secrets: dict[str, str | list[str]], *, bare: bool = False) -> None:
        super().__init__(secrets)
        self.bare = bare

    def __call__(self, account: str) -> t.Any:
        self.calls.append(account)
        name = _collated(account)
        if name not in self.secrets:
            return None
        return self.secrets[name] if self.bare else Account(name, self.secrets[name])


_ACCENTED = {"a": "áàâäå", "c": "ç", "e": "éèêë", "m": "m"}


@st.composite
def _spellings(draw: st.DrawFn) -> str:
    """A URL path segment that such a collation reads as ``acme``: any
    case, accents, NFC or NFD, trailing spaces, any character
    percent-encoded.
    """
    letters = []
    for letter in "acme":
        letter = draw(st.sampled_from([letter, *_ACCENTED[letter]]))
        letters.append(letter.upper() if draw(st.booleans()) else letter)
    text = "".join(letters) + " " * draw(st.integers(0, 3))
    text = unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), text)
    return "".join(quote(c, safe="") if c == " " or draw(st.booleans()) else c for c in text)


#: The spellings of the issue: a captured body ran once for each.
_ISSUE_SPELLINGS = ["ACME", "Acme", "acme%20", "%C3%A1cme", "a%CC%81cme", "%41cme"]


@settings(max_examples=60, deadline=None)
@given(st.lists(_spellings(), max_size=5))
def test_each_spelling_of_one_account_runs_once(spellings: list[str]) -> None:
    lookup = CollatedLookup({"acme": "whsec_acme"})
    shop = Shop(lookup)
    body = json.dumps(build_event("points.earned", id="evt_captured")).encode()
    paths = ["acme", *_ISSUE_SPELLINGS, *spellings]
    answers = [shop.post(path, "whsec_acme", body=body).get_json() for path in paths]
    assert answers == [{"received": True}] + [{"received": True, "duplicate": True}] * (
        len(paths) - 1
    )
    assert shop.seen == [("acme", "evt_captured")]
    # The lookup got each spelling as the URL decodes it.
    assert [unquote(path) for path in paths] == lookup.calls
    receiver = receiver_for(shop.app)
    store = receiver.store
    assert isinstance(store, InspectableStore)
    # One key in the store, under the canonical name.
    namespace = receiver.processor.namespace
    stored = {name for name in lookup.calls if store.get(namespace.key("evt_captured", name))}
    assert stored == {"acme"}


def test_bare_secrets_name_the_account_as_the_url_spells_it() -> None:
    # The documented risk of a lookup that does not return an Account.
    shop = Shop(CollatedLookup({"acme": "whsec_acme"}, bare=True))
    body = json.dumps(build_event("points.earned", id="evt_captured")).encode()
    _processed(shop.post("acme", "whsec_acme", body=body))
    _processed(shop.post("ACME", "whsec_acme", body=body))
    _duplicate(shop.post("ACME", "whsec_acme", body=body))
    assert shop.seen == [("acme", "evt_captured"), ("ACME", "evt_captured")]


def test_an_account_names_the_event_logs_and_signals(caplog: pytest.LogCaptureFixture) -> None:
    lookup = CollatedLookup({"acme": ["whsec_acme_new", "whsec_acme_old"]})
    shop = Shop(lookup)
    received: list[str | None] = []

    def record(sender: Flask, *, event: Event, **extra: t.Any) -> None:
        received.append(event.account)

    with (
        caplog.at_level(logging.INFO, "flask_ploints"),
        signals.event_received.connected_to(record, sender=shop.app),
    ):
        _processed(shop.post("%C3%81CME", "whsec_acme_old", "evt_1"))
        _rejected(shop.post("Acme", "whsec_other", "evt_2"))
    assert (shop.seen, received) == ([("acme", "evt_1")], ["acme"])
    accounts_logged = [
        getattr(r, "ploints_account", None) for r in caplog.records if r.name == "flask_ploints"
    ]
    assert accounts_logged == ["acme", "acme"]
    # The test client and the CLI sign with the account's current secret.
    _duplicate(PlointsClient(shop.app).send("points.earned", id="evt_1", account="ACME"))


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            Account("", "whsec_m1"),
            "the secret lookup returned an Account named '' for account 'm1': its name must be"
            " a printable string of 1 to 128 characters",
        ),
        (
            Account("m" * 129, "whsec_m1"),
            f"the secret lookup returned an Account named {'m' * 129!r}",
        ),
        (Account("m\n1", "whsec_m1"), "the secret lookup returned an Account named 'm\\n1'"),
        (Account("m\x1e1", "whsec_m1"), "the secret lookup returned an Account named 'm\\x1e1'"),
        (Account(42, "whsec_m1"), "the secret lookup returned an Account named 42"),  # type: ignore[arg-type]
        (Account("m1", "  "), "the secret lookup returned a str for account 'm1'"),
        (Account("m1", []), "the secret lookup returned a list for account 'm1'"),
        (Account("m1", ["whsec_ok", 7]), "the secret lookup returned a list for account 'm1'"),  # type: ignore[list-item]
        (Account("m1", None), "the secret lookup returned a NoneType for account 'm1'"),  # type: ignore[arg-type]
        (Account("m1", "whsec_\ud800"), "the secret lookup returned a secret for account 'm1'"),
    ],
)
def test_a_bad_account_is_503(
    answer: Account, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    shop = Shop(lambda account: answer)
    with caplog.at_level(logging.ERROR, "flask_ploints"):
        response, watched = _post_watched(shop.app, "m1", "whsec_m1")
    assert (response.status_code, response.get_json()) == (
        503,
        {"error": "secret lookup unavailable"},
    )
    assert (response.headers["Retry-After"], watched.used, shop.seen) == ("60", [], [])
    [record] = [r for r in caplog.records if r.name == "flask_ploints"]
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, SecretLookupError)
    assert str(error).startswith(message)


@dataclass(frozen=True)
class MerchantId:
    """The value of a custom converter: no string, and a string form of
    its own.
    """

    number: int

    def __str__(self) -> str:
        return f"merchant #{self.number}"


class MerchantConverter(BaseConverter):
    regex = r"m-\d+"

    def to_python(self, value: str) -> MerchantId:
        return MerchantId(int(value[2:]))

    def to_url(self, value: t.Any) -> str:
        return f"m-{value.number}"


_UUID = uuid.UUID("5b0c4a4e-3f8e-4d35-9d27-1c3a52e6f0b9")


@pytest.mark.parametrize(
    ("rule", "path", "value", "name"),
    [
        ("<account>", "acme", "acme", "acme"),
        ("<string:account>", "acme", "acme", "acme"),
        ("<int:account>", "42", 42, "42"),
        ("<uuid:account>", str(_UUID), _UUID, str(_UUID)),
        ("<path:account>", "eu/acme", "eu/acme", "eu/acme"),
        ("<float:account>", "1.5", 1.5, "1.5"),
        ("<any(acme, globex):account>", "globex", "globex", "globex"),
        ("<merchant:account>", "m-7", MerchantId(7), "merchant #7"),
    ],
)
def test_every_converter(rule: str, path: str, value: object, name: str) -> None:
    def lookup(account: object) -> str | None:
        calls.append(account)
        return "whsec_m" if account == value else None

    calls: list[object] = []
    shop = Shop(lookup, f"/webhooks/ploints/{rule}", {"merchant": MerchantConverter})
    _processed(shop.post(path, "whsec_m", "evt_1"))
    _duplicate(shop.post(path, "whsec_m", "evt_1"))
    _rejected(shop.post(path, "whsec_other", "evt_2"))
    assert calls == [value] * 3
    assert {type(call) for call in calls} == {type(value)}
    assert shop.seen == [(name, "evt_1")]


@pytest.mark.parametrize(
    ("rule", "name", "value"),
    [
        ("<int:account>", "42", 42),
        ("<uuid:account>", str(_UUID), _UUID),
        ("<float:account>", "1.5", 1.5),
        ("<path:account>", "eu/acme", "eu/acme"),
        ("<any(acme, globex):account>", "globex", "globex"),
    ],
)
def test_the_test_client_signs_for_a_converted_account(rule: str, name: str, value: object) -> None:
    # The lookup gets the converted value when the test client (or the
    # CLI) signs, as it does when the endpoint verifies.
    calls: list[object] = []

    def lookup(account: object) -> str | None:
        calls.append(account)
        return "whsec_m" if account == value else None

    shop = Shop(lookup, f"/webhooks/ploints/{rule}")
    _processed(PlointsClient(shop.app).send("points.earned", id="evt_1", account=name))
    assert (calls, shop.seen) == ([value, value], [(name, "evt_1")])


def test_a_converted_value_named_by_its_account() -> None:
    merchants = {_UUID: Account("acme", "whsec_acme")}
    shop = Shop(merchants.get, "/webhooks/ploints/<uuid:account>")
    _processed(shop.post(str(_UUID), "whsec_acme", "evt_1"))
    # The same UUID in capitals is the same value, and the same account.
    _duplicate(shop.post(str(_UUID).upper(), "whsec_acme", "evt_1"))
    _rejected(shop.post(str(uuid.uuid4()), "whsec_acme", "evt_2"))
    assert shop.seen == [("acme", "evt_1")]


def test_the_delivery_log_keeps_the_canonical_name(tmp_path: Path, unique: str) -> None:
    log = DeliveryLog.from_url(f"sqlite:///{tmp_path / 'log.db'}", table_name=unique)
    config = {
        "SECRET_KEY": "test-secret-key",
        "PLOINTS_DELIVERY_LOG": log,
        "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True,
    }
    try:
        shop = Shop(CollatedLookup({"acme": "whsec_acme"}), **config)
        _processed(shop.post("ACME", "whsec_acme", "evt_1"))
        _duplicate(shop.post("Acm%C3%A9", "whsec_acme", "evt_1"))
        rows = [(row.account, row.event_id, row.outcome) for row in log.recent()]
        assert rows == [("acme", "evt_1", "duplicate"), ("acme", "evt_1", "processed")]
        # A rejected request to a converted URL files no account: its
        # reason keeps the value's string form, unverified.
        other = Shop({_UUID: "whsec_u"}.get, "/webhooks/ploints/<uuid:account>", **config)
        _rejected(other.post(str(_UUID), "whsec_other", "evt_2"))
        assert [(row.account, row.outcome, row.reason) for row in log.recent(1)] == [
            (None, "rejected", f"invalid signature (to account '{_UUID}' per its URL, unverified)")
        ]
    finally:
        log.engine.dispose()


def test_unknown_account_answers_as_a_bad_signature(caplog: pytest.LogCaptureFixture) -> None:
    shop = Shop(Lookup({"m1": "whsec_m1"}))
    with caplog.at_level(logging.WARNING, "flask_ploints"):
        unknown = shop.post("m9", "whsec_m1", "evt_1")
        wrong = shop.post("m1", "whsec_m9", "evt_1")
    assert (unknown.status_code, unknown.headers.to_wsgi_list(), unknown.data) == (
        wrong.status_code,
        wrong.headers.to_wsgi_list(),
        wrong.data,
    )
    assert (unknown.status_code, unknown.data) == (401, b'{"error": "invalid signature"}\n')
    # The log still tells them apart.
    assert [r.getMessage() for r in caplog.records if r.name == "flask_ploints"] == [
        "rejected a delivery: unknown account 'm9'",
        "rejected a delivery: invalid signature",
    ]


def _cached_lookup_example() -> types.ModuleType:
    path = Path(__file__).resolve().parent.parent / "docs" / "examples" / "cached_lookup.py"
    spec = importlib.util.spec_from_file_location("ploints_docs_cached_lookup", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SlowTable:
    """A lookup that takes a while, as a database under load does, and
    counts its calls and how many ran at once.
    """

    def __init__(self, secrets: dict[str, str], delay: float) -> None:
        self.secrets = secrets
        self.delay = delay
        self.calls: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, account: str) -> Account | None:
        with self._lock:
            self.calls.append(account)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay)
            found = self.secrets.get(account)
            return None if found is None else Account(account, found)
        finally:
            with self._lock:
                self.running -= 1


class Served:
    """A threaded werkzeug server of ``app`` on a real socket."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def post(
        self, account: str, secret: str, event_id: str, timeout: float = 10
    ) -> tuple[int, str, str | None]:
        body = json.dumps(build_event("points.earned", id=event_id)).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        try:
            connection.request(
                "POST",
                f"/webhooks/ploints/{account}",
                body,
                {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)},
            )
            response = connection.getresponse()
            return response.status, response.read().decode(), response.getheader("Retry-After")
        finally:
            connection.close()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


def test_a_flood_of_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # The docs' cached lookup in front of a slow table, on a threaded
    # server: 16 threads send 400 made-up names, signed with the real
    # account's secret, while the real account keeps sending.
    monkeypatch.setattr(accounts, "LOOKUPS_IN_FLIGHT", 4)
    table = SlowTable({"acme": "whsec_acme"}, delay=0.02)
    shop = Shop(_cached_lookup_example().cached_for(60)(table))
    served = Served(shop.app)
    answers: Counter[tuple[int, str, str | None]] = Counter()
    real: Counter[tuple[int, str, str | None]] = Counter()
    lock = threading.Lock()

    def flood(worker: int) -> None:
        for number in range(25):
            answer = served.post(f"forged{worker}x{number}", "whsec_acme", f"evt_{number}")
            known = served.post("acme", "whsec_acme", f"evt_{worker}_{number}")
            with lock:
                answers[answer] += 1
                real[known] += 1

    try:
        assert served.post("acme", "whsec_acme", "evt_first")[0] == 200
        workers = [threading.Thread(target=flood, args=(worker,)) for worker in range(16)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert served.post("acme", "whsec_acme", "evt_last")[0] == 200
    finally:
        served.close()
    busy = (503, '{"error": "secret lookup busy"}\n', "60")
    # Every made-up name is refused as a bad signature, or told to come back.
    assert set(answers) <= {(401, '{"error": "invalid signature"}\n', None), busy}
    assert sum(answers.values()) == 400
    # The real account's deliveries ran, or were told to come back: none lost.
    assert set(real) <= {(200, '{"received": true}\n', None), busy}
    processed = real[(200, '{"received": true}\n', None)]
    assert len(shop.seen) == processed + 2
    # Never more lookups at once than the bound; each name asked at most
    # once; the real account asked once, never pushed out of the cache.
    assert table.most_at_once <= 4
    assert len(table.calls) == len(set(table.calls))
    assert table.calls.count("acme") == 1


def test_slow_lookups_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two lookups hang; the next deliveries are answered 503 at once (well
    # within the socket's 5 s), without calling the lookup, until one ends.
    monkeypatch.setattr(accounts, "LOOKUPS_IN_FLIGHT", 2)
    release = threading.Event()
    entered = threading.Semaphore(0)
    calls: list[str] = []

    def lookup(account: str) -> str | None:
        calls.append(account)
        entered.release()
        release.wait(30)
        return "whsec_m1" if account == "m1" else None

    shop = Shop(lookup)
    served = Served(shop.app)
    held: list[tuple[int, str, str | None]] = []

    def hang(event_id: str) -> None:
        held.append(served.post("m1", "whsec_m1", event_id, timeout=30))

    hanging = [threading.Thread(target=hang, args=(f"evt_{n}",)) for n in range(2)]
    try:
        for thread in hanging:
            thread.start()
        assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
        for event_id in ("evt_2", "evt_3", "evt_4"):
            assert served.post("m1", "whsec_m1", event_id, timeout=5) == (
                503,
                '{"error": "secret lookup busy"}\n',
                "60",
            )
        release.set()
        for thread in hanging:
            thread.join(30)
        assert served.post("m1", "whsec_m1", "evt_2", timeout=5)[0] == 200
    finally:
        release.set()
        served.close()
    assert held == [(200, '{"received": true}\n', None)] * 2
    assert calls == ["m1"] * 3
    assert sorted(shop.seen) == [("m1", "evt_0"), ("m1", "evt_1"), ("m1", "evt_2")]


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
        _rejected(_post(app, "m9", "whsec_m2", "evt_unknown"))
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


def test_an_account_under_its_spellings_on_a_celery_worker(
    account_workers: Workers, ledger: Ledger
) -> None:
    # The lookup finds the account under each spelling and names it
    # "merchant-1", a name it does not answer for itself: the worker calls
    # it with the value of the delivery's URL, on a retry too.
    ledger.set_account("merchant-1", "whsec_acme", ["ACME", "Acme", "acme"])
    account_workers.config = {
        "PLOINTS_CELERY_MAX_RETRIES": 1,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
        "PLOINTS_CELERY_RETRY_BACKOFF_MAX": 0.3,
    }
    made = _web_app(account_workers)
    app = next(made)
    try:
        _queued(_post(app, "ACME", "whsec_acme", "evt_same"))
        # Its claim is held for the queued task, whatever the spelling.
        in_flight = _post(app, "Acme", "whsec_acme", "evt_same")
        assert (in_flight.status_code, in_flight.get_json()) == (
            409,
            {"error": "event is being processed"},
        )
        _queued(_post(app, "Acme", "whsec_acme", "evt_retry", fail=True))
        _queued(_post(app, "acme", "whsec_acme", "evt_drain"))
        account_workers.start(POOL)
        _until(
            lambda: (
                "merchant-1/evt_drain" in ledger.count("event_processed")
                and ledger.count("handler_failed") == {"merchant-1/evt_retry": 1}
            ),
            "the worker to process evt_drain and to give evt_retry up",
        )
        # evt_retry ran on its first attempt and on its retry.
        assert ledger.count("starts") == {
            "merchant-1/evt_same": 1,
            "merchant-1/evt_retry": 2,
            "merchant-1/evt_drain": 1,
        }
        assert ledger.count("effects") == {
            "worker:merchant-1/evt_same": 1,
            "worker:merchant-1/evt_drain": 1,
        }
        assert ledger.count("lookups") == {
            "web:ACME": 1,
            "web:Acme": 2,
            "web:acme": 1,
            "worker:ACME": 1,
            "worker:Acme": 2,
            "worker:acme": 1,
        }
        _duplicate(_post(app, "Acme", "whsec_acme", "evt_same"))
        result = _run(app, "failed")
        assert re.fullmatch(
            r"evt_retry  \S+ \S+Z  attempts=2  account=merchant-1  RuntimeError: handler broke"
            r" on purpose on merchant-1/evt_retry\n",
            result.output,
        ), result.output
    finally:
        next(made, None)
