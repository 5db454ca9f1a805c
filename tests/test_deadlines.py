"""Bounded time against a database that stops answering: its TCP
connections stay open, nothing comes back (a stuck proxy, a failover). The
SQL store answers ``503`` within its statement timeout, the delivery log
skips its row, and both recover when the database answers again.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import typing as t
import uuid
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ploints import PlointsWebhooks
from flask_ploints import StoreError
from flask_ploints.delivery_log import delivery_log
from flask_ploints.state import receiver_for
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.testing import PlointsClient

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


@pytest.fixture
def proxied_url(postgres_url: str) -> t.Iterator[tuple[str, FreezingProxy]]:
    parts = urlsplit(postgres_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl(), proxy
    proxy.close()


@pytest.fixture
def table(postgres_url: str) -> t.Iterator[str]:
    name = f"ploints_deadline_{uuid.uuid4().hex[:8]}"
    yield name
    engine = sa.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
    engine.dispose()


def _timed(call: t.Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    try:
        result: object = call()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


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
        # (libpq counts at least 2 s) bounds it.
        result, took = _timed(lambda: store.claim("evt_frozen", 60))
        assert isinstance(result, StoreError)
        assert took < 2 + SLACK
        proxy.thaw()
        assert store.claim("evt_after", 60).status is ClaimStatus.CLAIMED
    finally:
        proxy.thaw()
        store.close()
        store.engine.dispose()


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
