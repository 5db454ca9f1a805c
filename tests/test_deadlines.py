"""Bounded time against a database that stops answering: its TCP
connections stay open, nothing comes back (a stuck proxy, a failover). The
SQL store (from a URL, or ``db``, on PostgreSQL and MariaDB) answers ``503``
within its statement timeout, the delivery log skips its row, and both
recover when the database answers again.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
import typing as t
import uuid
from urllib.parse import urlsplit

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.test import TestResponse

from flask_ploints import PlointsWebhooks
from flask_ploints import StoreError
from flask_ploints._state import receiver_for
from flask_ploints.delivery_log import delivery_log
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.stores._sql.deadline import deadline
from flask_ploints.testing import PlointsClient

from .session_app import PROCESSED
from .session_app import Shop
from .session_app import answer
from .session_app import body
from .support import build_app

#: The statement timeout under test, and how long past it an answer may come.
TIMEOUT = 1.0
SLACK = 1.5


class FreezingProxy:
    """A TCP forwarder on a loopback port that can freeze: it keeps every
    connection open and accepts new ones, but passes no byte either way.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        for sock in [self.listener, *self.sockets]:
            sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.flowing.wait()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.closed:
            try:
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    self.flowing.wait()
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
            except (OSError, ValueError):
                return


@pytest.fixture(params=["postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    """The URL of the database under test: PostgreSQL unless a test
    parametrizes it (``indirect``) with ``"mariadb"`` too.
    """
    url: str = request.getfixturevalue(
        {"postgresql": "postgres_url", "mariadb": "mariadb_url"}[request.param]
    )
    return url


@pytest.fixture
def proxied_url(database: str) -> t.Iterator[tuple[str, FreezingProxy]]:
    parts = urlsplit(database)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl(), proxy
    proxy.close()


@pytest.fixture
def table(database: str) -> t.Iterator[str]:
    name = f"ploints_deadline_{uuid.uuid4().hex[:8]}"
    yield name
    engine = sa.create_engine(database)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}_awards"))
        connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


BOTH = pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)


def _timed(call: t.Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    try:
        result: object = call()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


@BOTH
def test_a_silent_database_is_a_store_error_within_the_timeout(
    proxied_url: tuple[str, FreezingProxy], table: str
) -> None:
    url, proxy = proxied_url
    store = SQLAlchemyStore.from_url(url, table_name=table, timeout=TIMEOUT)
    try:
        assert store.claim("evt_before", 60).status is ClaimStatus.CLAIMED
        proxy.freeze()
        result, took = _timed(lambda: store.claim("evt_frozen", 60))
        assert isinstance(result, StoreError)
        assert took < TIMEOUT + SLACK
        # A new connection meets the same silence: the connect timeout
        # (libpq counts at least 2 s; PyMySQL 1 s) bounds it.
        result, took = _timed(lambda: store.claim("evt_frozen", 60))
        assert isinstance(result, StoreError)
        assert took < 2 + SLACK
        proxy.thaw()
        assert store.claim("evt_after", 60).status is ClaimStatus.CLAIMED
    finally:
        proxy.thaw()
        store.close()
        store.engine.dispose()


@BOTH
def test_a_silent_store_answers_503_well_inside_the_senders_timeout(
    proxied_url: tuple[str, FreezingProxy], table: str, webhooks: PlointsWebhooks
) -> None:
    url, proxy = proxied_url
    app, _ = build_app(
        {"PLOINTS_DEDUPE_STORE": url, "PLOINTS_SQL_TABLE": table, "PLOINTS_SQL_TIMEOUT": TIMEOUT},
        webhooks,
    )
    ran: list[str] = []
    webhooks.on_any(lambda event: ran.append(event.id))
    client = PlointsClient(app)
    assert client.send("points.earned", id="evt_1").status_code == 200
    proxy.freeze()
    response, took = _timed(lambda: client.send("points.earned", id="evt_2"))
    proxy.thaw()
    assert getattr(response, "status_code", response) == 503
    assert took < 2 + SLACK
    # The claim may have reached the database once it answered again (a
    # proxy passing on what it held): then it holds until its lease ends,
    # and the sender's retry after that runs the event.
    retry = client.send("points.earned", id="evt_2")
    assert retry.status_code in (200, 409)
    if retry.status_code == 409:
        assert 0 < int(retry.headers["Retry-After"]) <= 30
    assert client.send("points.earned", id="evt_3").status_code == 200
    assert ran == ["evt_1", "evt_2", "evt_3"] if retry.status_code == 200 else ["evt_1", "evt_3"]
    store = receiver_for(app).store
    store.close()  # type: ignore[attr-defined]
    store.engine.dispose()  # type: ignore[attr-defined]


def test_a_silent_delivery_log_skips_its_row_and_never_holds_a_delivery(
    proxied_url: tuple[str, FreezingProxy], caplog: pytest.LogCaptureFixture
) -> None:
    url, proxy = proxied_url
    app = _logged_app(url)
    client = PlointsClient(app)
    assert client.send("points.earned", id="evt_1").status_code == 200
    proxy.freeze()
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        for number in range(3):
            event_id = f"evt_f{number}"
            response, took = _timed(lambda: client.send("points.earned", id=event_id))  # noqa: B023
            assert getattr(response, "status_code", response) == 200
            # The first waits for the deadline; then the log is skipped
            # without waiting until its pause is over.
            assert took < (TIMEOUT + SLACK if number == 0 else 0.5)
    proxy.thaw()
    delivery_log(app).engine.dispose()
    assert [record.getMessage() for record in caplog.records] == [
        "the delivery log failed to record a processed delivery; it skips its rows for 30 s"
    ]


@BOTH
@pytest.mark.parametrize("advised", [True, False], ids=["advised", "bare"])
def test_a_silent_database_with_db_answers_503_within_the_timeout(
    proxied_url: tuple[str, FreezingProxy], table: str, advised: bool
) -> None:
    """``PLOINTS_DEDUPE_STORE = db``, with the engine options the docs advise
    (a connect timeout) and with none: the extension's own statements are
    bounded whatever the app's engine does.
    """
    url, proxy = proxied_url
    options = {"connect_args": {"connect_timeout": 2}} if advised else {}
    shop = Shop(url, table, engine_options=options, PLOINTS_SQL_TIMEOUT=TIMEOUT)
    try:
        assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
        proxy.freeze()
        try:
            response, took = _timed(lambda: shop.sender.post(body("evt_2")))
        finally:
            proxy.thaw()
        assert answer(t.cast(TestResponse, response)) == (
            503,
            {"error": "dedupe store unavailable"},
        )
        # Its lock wait, then its statements, each at most the timeout.
        assert took < 2 * TIMEOUT + SLACK
        proxy.freeze()
        try:
            response, took = _timed(lambda: shop.sender.post(body("evt_2")))
        finally:
            proxy.thaw()
        # A new connection meets the same silence: the connect timeout the
        # app gave, or the store's (libpq counts at least 2 s).
        assert answer(t.cast(TestResponse, response))[0] == 503
        assert took < 2 + SLACK
        retry = shop.sender.post(body("evt_2"))
        assert retry.status_code in (200, 409)
        assert answer(shop.sender.post(body("evt_3"))) == (200, PROCESSED)
        expected = ["evt_1", "evt_2", "evt_3"] if retry.status_code == 200 else ["evt_1", "evt_3"]
        assert shop.rows() == expected
    finally:
        with shop.app.app_context():
            shop.db.engine.dispose()


def _logged_app(url: str) -> Flask:
    webhooks = PlointsWebhooks()
    app, _ = build_app(
        {
            "SECRET_KEY": "test",
            "PLOINTS_DELIVERY_LOG": url,
            "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True,
            "PLOINTS_DELIVERY_LOG_TIMEOUT": TIMEOUT,
        },
        webhooks,
    )
    webhooks.on_any(lambda event: None)
    return app


def test_many_threads_on_sqlite_wait_a_bounded_time(tmp_path: t.Any) -> None:
    """SQLite has one writer: calls queue for it, each at most the store's
    statement timeout, then fail as the store being unavailable.
    """
    store = SQLAlchemyStore.from_url(f"sqlite:///{tmp_path / 'one.db'}", timeout=TIMEOUT)
    try:
        assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
        results: list[object] = []
        # The store's writer lock, held as a long call of another thread would.
        assert store._table.lock is not None
        with store._table.lock:
            thread = threading.Thread(
                target=lambda: results.append(_timed(lambda: store.claim("evt_2", 60)))
            )
            thread.start()
            thread.join(TIMEOUT + SLACK)
        [(result, took)] = results  # type: ignore[misc]
        assert isinstance(result, StoreError)
        assert str(result) == "database: SQLite's writer was busy for more than 1 s"
        assert TIMEOUT <= took < TIMEOUT + SLACK
        assert store.claim("evt_2", 60).status is ClaimStatus.CLAIMED
    finally:
        store.engine.dispose()


def test_pymysql_connections_are_guarded(mariadb_url: str) -> None:
    """The deadline finds PyMySQL's socket, which it offers no public way
    to: this pins the one use of its internals.
    """
    url = sa.make_url(mariadb_url)
    connection = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, database=url.database
    )
    try:
        cursor = connection.cursor()
        started = time.monotonic()
        with deadline(connection, TIMEOUT) as guard, pytest.raises(pymysql.err.OperationalError):
            cursor.execute("SELECT SLEEP(10)")
        assert guard.fired
        assert time.monotonic() - started < TIMEOUT + SLACK
    finally:
        with contextlib.suppress(Exception):
            connection.close()
