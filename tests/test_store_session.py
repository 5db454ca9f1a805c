"""The SessionStore (``PLOINTS_DEDUPE_STORE = db``) through the real
endpoint, on PostgreSQL, SQLite (a file) and MariaDB: the handlers' writes
and the dedupe record commit together or not at all, concurrent deliveries
of one id commit once and wait a bounded time, and inspection, replay and
the delivery log keep working. Each test has its own tables (``unique``),
dropped afterwards. The app is :class:`tests.session_app.Shop`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from werkzeug.test import TestResponse

from flask_ploints import ConfigError
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import current_session
from flask_ploints._cli import ploints
from flask_ploints.delivery_log import DeliveryLog
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import rerun
from flask_ploints.stores import EventState
from flask_ploints.stores import SessionStore
from flask_ploints.stores import store_from_config
from flask_ploints.testing import PlointsClient

from .session_app import DATABASES
from .session_app import DUPLICATE
from .session_app import PROCESSED
from .session_app import WAIT
from .session_app import Plain
from .session_app import Shop
from .session_app import answer
from .session_app import body
from .session_app import database_url
from .session_app import model
from .support import SECRET
from .support import build_app
from .test_faults import Proxy


@pytest.fixture(params=DATABASES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, request.param, tmp_path)


@pytest.fixture
def make_shop(database: str, unique: str) -> t.Iterator[t.Callable[..., Shop]]:
    made: list[Shop] = []

    def make(url: str = database, **kwargs: t.Any) -> Shop:
        made.append(Shop(url, unique, **kwargs))
        return made[-1]

    yield make
    for shop in made:
        shop.close()


def _timed_post(client: PlointsClient, data: bytes) -> tuple[TestResponse, float]:
    started = time.monotonic()
    response = client.post(data)
    return response, time.monotonic() - started


def test_handler_writes_commit_with_the_event(make_shop: t.Callable[..., Shop]) -> None:
    shop = make_shop()
    assert answer(shop.sender.send("points.earned", id="evt_1")) == (200, PROCESSED)
    assert shop.rows() == ["evt_1"]
    stored = shop.stored("evt_1")
    assert stored is not None
    assert (stored.status, stored.attempts) == (EventState.DONE, 1)


def test_retry_after_processed_is_a_duplicate(make_shop: t.Callable[..., Shop]) -> None:
    shop = make_shop()
    assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
    assert answer(shop.sender.post(body("evt_1"))) == (200, DUPLICATE)
    assert shop.runs == ["evt_1"]
    assert shop.rows() == ["evt_1"]


def test_handler_failure_rolls_back_its_writes(make_shop: t.Callable[..., Shop]) -> None:
    shop = make_shop()
    shop.mode = "raise"
    assert answer(shop.sender.post(body("evt_1"))) == (500, {"error": "handler failed"})
    assert shop.rows() == []
    assert shop.stored("evt_1") is None

    shop.mode = "ok"
    assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
    assert shop.runs == ["evt_1", "evt_1"]
    assert shop.rows() == ["evt_1"]


def test_handler_commit_fails_the_event(
    make_shop: t.Callable[..., Shop], caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that calls ``db.session.commit()`` commits what the
    transaction held so far: its own write *and* the event's dedupe row,
    which the store wrote marked done. The event fails (500, an error log
    naming the commit); what the handler wrote after its commit is rolled
    back. The sender's retry then answers duplicate and runs nothing: no
    write is doubled, but the writes after the commit are lost for good.
    """
    shop = make_shop()
    shop.mode = "commit"
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        assert answer(shop.sender.post(body("evt_1"))) == (500, {"error": "handler failed"})
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "event 'evt_1' ('points.earned') failed: a handler raised HandlerError(" in (
        record.getMessage()
    )
    assert "committed or rolled back the session" in record.getMessage()
    assert shop.rows() == ["evt_1"]
    stored = shop.stored("evt_1")
    assert stored is not None and stored.status is EventState.DONE

    shop.mode = "ok"
    assert answer(shop.sender.post(body("evt_1"))) == (200, DUPLICATE)
    assert shop.runs == ["evt_1"]
    assert shop.rows() == ["evt_1"]


def test_handler_commit_of_the_connection_fails_the_event(
    make_shop: t.Callable[..., Shop], caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that commits the session's connection
    (``db.session.connection().commit()``) commits as ``db.session.commit()``
    does: its write and the event's row. The event fails with a 500 and an
    error log that names the commit and claims no rollback of what it
    committed; what it wrote after is rolled back; the retry is a duplicate.
    """
    shop = make_shop()
    shop.mode = "connection commit"
    # SQLAlchemy's own word, when the store rolls back the rest.
    warns = pytest.warns(sa.exc.SAWarning, match="^transaction already deassociated")
    with caplog.at_level(logging.ERROR, logger="flask_ploints"), warns:
        assert answer(shop.sender.post(body("evt_1"))) == (500, {"error": "handler failed"})
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "event 'evt_1' ('points.earned') failed: a handler raised HandlerError(" in message
    assert "committed or rolled back the session" in message
    assert "rolled back" not in message.replace("committed or rolled back the session", "")
    assert shop.rows() == ["evt_1"]
    stored = shop.stored("evt_1")
    assert stored is not None and stored.status is EventState.DONE
    shop.mode = "ok"
    assert answer(shop.sender.post(body("evt_1"))) == (200, DUPLICATE)
    assert shop.runs == ["evt_1"]
    assert shop.rows() == ["evt_1"]


def test_handler_commit_statement_goes_unseen_and_is_logged_truly(
    make_shop: t.Callable[..., Shop], caplog: pytest.LogCaptureFixture
) -> None:
    """A ``COMMIT`` statement (``db.session.execute(text("COMMIT"))``) is
    invisible to SQLAlchemy: the store commits the rest, so every write
    commits, in two transactions. When a handler raises after one, the
    event fails (500), what it wrote after is rolled back, and the log
    claims no rollback of what the statement committed.
    """
    shop = make_shop()
    shop.mode = "raw commit"
    assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
    assert shop.rows() == ["evt_1", "evt_1 after the commit"]

    def fail(event: Event) -> None:
        shop.db.session.execute(sa.text("COMMIT"))
        raise RuntimeError("broken after its COMMIT")

    shop.mode = "ok"
    shop.then = fail
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        assert answer(shop.sender.post(body("evt_2"))) == (500, {"error": "handler failed"})
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert messages == [
        "event 'evt_2' ('points.earned') failed: a handler raised"
        " RuntimeError('broken after its COMMIT')"
    ]
    # The row the statement committed makes the retry a duplicate.
    assert answer(shop.sender.post(body("evt_2"))) == (200, DUPLICATE)
    assert shop.rows() == ["evt_1", "evt_1 after the commit", "evt_2"]


def test_handler_that_swallows_a_database_error_fails_the_event(
    make_shop: t.Callable[..., Shop], caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that catches an ``IntegrityError`` leaves the transaction
    unusable: a handler failure (500, a log that says so), not the store's;
    nothing is committed, and the retry runs the event again.
    """
    shop = make_shop()
    assert answer(shop.sender.post(body("evt_0"))) == (200, PROCESSED)
    shop.mode = "swallow"
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        assert answer(shop.sender.post(body("evt_1"))) == (500, {"error": "handler failed"})
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "event 'evt_1' ('points.earned') failed: a handler raised HandlerError(" in message
    assert "left the session's transaction unusable" in message
    assert "dedupe store" not in message
    assert shop.rows() == ["evt_0"]
    assert shop.stored("evt_1") is None
    shop.mode = "ok"
    assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
    assert shop.runs == ["evt_0", "evt_1", "evt_1"]
    assert shop.rows() == ["evt_0", "evt_1"]


def test_same_id_at_once_commits_once(make_shop: t.Callable[..., Shop]) -> None:
    shop = make_shop()
    shop.delay = 0.3
    copies = 8
    start = threading.Barrier(copies)
    data = body("evt_1")

    def deliver(_: int) -> tuple[TestResponse, float]:
        client = PlointsClient(shop.app)
        start.wait(WAIT)
        return _timed_post(client, data)

    with ThreadPoolExecutor(copies) as pool:
        answers = list(pool.map(deliver, range(copies)))
    bodies = [answer(response) for response, _ in answers]
    assert bodies.count((200, PROCESSED)) == 1, bodies
    others = [other for other in bodies if other != (200, PROCESSED)]
    conflict = (409, {"error": "event is being processed"})
    assert all(other in ((200, DUPLICATE), conflict) for other in others), bodies
    # PLOINTS_SQL_TIMEOUT is the default, 2 s.
    assert max(seconds for _, seconds in answers) < 2.0 + 3.0
    assert shop.runs == ["evt_1"]
    assert shop.rows() == ["evt_1"]


def test_lock_wait_is_bounded(make_shop: t.Callable[..., Shop], database: str) -> None:
    shop = make_shop(PLOINTS_SQL_TIMEOUT=1)
    gate = shop.gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(shop.sender.post, body("evt_1"))
        assert shop.inside.wait(WAIT)
        # The first delivery holds its transaction until this one answered.
        second, seconds = _timed_post(PlointsClient(shop.app), body("evt_1"))
        gate.set()
        assert answer(first.result(WAIT)) == (200, PROCESSED)
    if database.startswith("sqlite"):
        # The whole database's lock: not known to be this id's delivery.
        expected = ((503, {"error": "dedupe store unavailable"}), "60")
    else:
        expected = ((409, {"error": "event is being processed"}), "1")
    assert (answer(second), second.headers["Retry-After"]) == expected
    assert seconds < 1.0 + 3.0
    assert answer(shop.sender.post(body("evt_1"))) == (200, DUPLICATE)
    assert shop.runs == ["evt_1"]
    assert shop.rows() == ["evt_1"]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_transaction_timeout_frees_the_lock(
    make_shop: t.Callable[..., Shop], unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler stuck past ``transaction_timeout`` has its connection cut,
    which rolls its transaction back and frees the row: a delivery of the
    same id meanwhile is processed, and the stuck one fails on its commit.
    """
    db = SQLAlchemy()
    store = SessionStore(db.session, table_name=unique, lock_timeout=2.5, transaction_timeout=0.5)
    shop = make_shop(db=db, PLOINTS_DEDUPE_STORE=store)
    gate = shop.gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(shop.sender.post, body("evt_1"))
        assert shop.inside.wait(WAIT)
        assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
        gate.set()
        assert answer(stuck.result(WAIT)) == (503, {"error": "dedupe store unavailable"})
    assert "not committed: the dedupe store failed" in caplog.text
    assert shop.runs == ["evt_1", "evt_1"]
    assert shop.rows() == ["evt_1"]
    assert answer(shop.sender.post(body("evt_1"))) == (200, DUPLICATE)


@pytest.fixture
def proxied(database: str) -> t.Iterator[tuple[str, Proxy]]:
    """The database's URL through a TCP proxy, which can be stopped (every
    connection closed, new ones refused) and started again.
    """
    url = sa.make_url(database)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 0))
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.stop()


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
def test_database_down_answers_503(
    proxied: tuple[str, Proxy], make_shop: t.Callable[..., Shop]
) -> None:
    url, proxy = proxied
    shop = make_shop(url, engine_options={"connect_args": {"connect_timeout": 2}})
    assert answer(shop.sender.post(body("evt_1"))) == (200, PROCESSED)
    proxy.stop()
    try:
        down, seconds = _timed_post(shop.sender, body("evt_2"))
    finally:
        # The tables are dropped through the proxy, after the test.
        proxy.start()
    assert answer(down) == (503, {"error": "dedupe store unavailable"})
    assert down.headers["Retry-After"] == "60"
    assert seconds < 5.0
    assert answer(shop.sender.post(body("evt_2"))) == (200, PROCESSED)
    assert answer(shop.sender.post(body("evt_2"))) == (200, DUPLICATE)
    assert shop.runs == ["evt_1", "evt_2"]
    assert shop.rows() == ["evt_1", "evt_2"]


def test_sessionmaker_and_current_session(database: str, unique: str) -> None:
    engine = sa.create_engine(database)
    plain = Plain(engine, unique, sessionmaker(engine), current_session)
    try:
        plain.check_exactly_once()
        # The store's own session per event, closed after it.
        assert len(plain.sessions) == 2
        assert plain.sessions[0] is not plain.sessions[1]
    finally:
        plain.close(unique)


def test_scoped_session(database: str, unique: str) -> None:
    engine = sa.create_engine(database)
    registry = scoped_session(sessionmaker(engine))
    plain = Plain(engine, unique, registry, registry)
    plain.app.teardown_appcontext(lambda _: registry.remove())
    try:
        plain.check_exactly_once()
        assert plain.sessions[0] is not plain.sessions[1]
    finally:
        plain.close(unique)


def test_config_accepts_db_and_sessions(tmp_path: Path, unique: str) -> None:
    db = SQLAlchemy()
    config = {"PLOINTS_SQL_TABLE": unique, "PLOINTS_SQL_TIMEOUT": 1.5}
    store = store_from_config(db, config)
    assert isinstance(store, SessionStore)
    assert (store.session, store.table_name, store.lock_timeout) == (db.session, unique, 1.5)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    maker = sessionmaker(engine)
    registry = scoped_session(maker)
    store = store_from_config(registry, config)
    assert isinstance(store, SessionStore) and store.session is registry
    store = store_from_config(maker, config)
    assert isinstance(store, SessionStore) and store.session.session_factory is maker
    for wrong, name in [(engine, "Engine"), (maker(), "Session")]:
        with pytest.raises(ConfigError) as raised:
            build_app({"PLOINTS_DEDUPE_STORE": wrong})
        assert str(raised.value) == (
            "PLOINTS_DEDUPE_STORE must be a store, a Flask-SQLAlchemy extension or session, a"
            f" name, a URL or None, not {name}"
        )
    engine.dispose()

    # An app factory: the extensions made before any app, one store per app.
    webhooks = PlointsWebhooks()
    award = model(f"{unique}_awards")
    webhooks.on_any(lambda event: db.session.add(award(event_id=event.id)))

    def create_app(path: Path) -> Flask:
        app = Flask("ploints_factory_test")
        app.config.update(
            SQLALCHEMY_DATABASE_URI=f"sqlite:///{path}",
            PLOINTS_WEBHOOK_SECRET=SECRET,
            PLOINTS_DEDUPE_STORE=db,
            PLOINTS_SQL_TABLE=unique,
        )
        db.init_app(app)
        webhooks.init_app(app)
        with app.app_context():
            award.metadata.create_all(db.engine)
        return app

    apps = [create_app(tmp_path / "a.db"), create_app(tmp_path / "b.db")]
    stores = [app.extensions["ploints"]["ploints"].store for app in apps]
    assert all(isinstance(store, SessionStore) for store in stores)
    assert stores[0] is not stores[1]
    for app in apps:
        assert answer(PlointsClient(app).post(body("evt_1"))) == (200, PROCESSED)
        assert answer(PlointsClient(app).post(body("evt_1"))) == (200, DUPLICATE)
    for app in apps:
        with app.app_context():
            assert db.session.scalars(sa.select(award.__table__.c.event_id)).all() == ["evt_1"]
            db.engine.dispose()


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(ploints, list(args))


def test_failed_replay_purge_cli(make_shop: t.Callable[..., Shop]) -> None:
    shop = make_shop()
    shop.mode = "raise"
    assert rerun(shop.app, body("evt_1")) is ReplayOutcome.FAILED
    assert shop.rows() == []
    result = run(shop.app, "failed")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"evt_1  \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  attempts=1  RuntimeError: broken on evt_1\n",
        result.output,
    )

    shop.mode = "ok"
    result = run(shop.app, "replay", "evt_1")
    assert (result.exit_code, result.output) == (0, "evt_1: processed\n")
    assert shop.runs == ["evt_1", "evt_1"]
    assert shop.rows() == ["evt_1"]
    stored = shop.stored("evt_1")
    assert stored is not None
    assert (stored.status, stored.attempts) == (EventState.DONE, 2)
    assert (run(shop.app, "failed").output, run(shop.app, "replay", "evt_1").output) == (
        "no failed events\n",
        "Error: event 'evt_1' is done, not failed\n",
    )
    assert shop.runs == ["evt_1", "evt_1"]

    store = shop.store
    assert isinstance(store, SessionStore)
    with shop.app.app_context():
        # Kept for no time: past its retention at once.
        claim = store.claim("evt_old", 60)
        assert store.commit("evt_old", claim.token, 0)
    result = run(shop.app, "purge")
    assert (result.exit_code, result.output) == (0, "purged 1 expired event(s)\n")
    assert shop.stored("evt_old") is None
    assert shop.stored("evt_1") is not None


PAGE = "/ploints/deliveries"


def test_delivery_log_rerun(make_shop: t.Callable[..., Shop], tmp_path: Path, unique: str) -> None:
    log = DeliveryLog.from_url(f"sqlite:///{tmp_path / 'log.db'}", table_name=f"{unique}_log")
    try:
        shop = make_shop(
            SECRET_KEY="test-secret-key",
            PLOINTS_DELIVERY_LOG=log,
            PLOINTS_DELIVERY_LOG_ACCESS=lambda: True,
        )
        shop.mode = "raise"
        assert shop.sender.post(body("evt_1")).status_code == 500
        (failed,) = log.recent(outcome="failed")
        shop.mode = "ok"
        browser = shop.app.test_client()
        page = browser.get(f"{PAGE}/{failed.id}").get_data(as_text=True)
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match is not None
        form = {"csrf_token": match.group(1)}

        response = browser.post(f"{PAGE}/{failed.id}/rerun", data=form)
        assert (response.status_code, response.headers["Location"]) == (303, f"{PAGE}/{failed.id}")
        assert shop.runs == ["evt_1", "evt_1"]
        assert shop.rows() == ["evt_1"]
        assert "Re-run of evt_1: processed." in browser.get(f"{PAGE}/{failed.id}").get_data(
            as_text=True
        )
        # A second press runs nothing.
        browser.post(f"{PAGE}/{failed.id}/rerun", data=form)
        assert "Re-run of evt_1: duplicate." in browser.get(f"{PAGE}/{failed.id}").get_data(
            as_text=True
        )
        assert shop.runs == ["evt_1", "evt_1"]
        assert shop.rows() == ["evt_1"]
    finally:
        log.table.drop(log.engine, checkfirst=True)
        log.engine.dispose()
