"""A Flask-SQLAlchemy app whose dedupe store is its own ``db`` (a
:class:`~flask_ploints.stores.SessionStore`), for the tests of that store and
of :func:`flask_ploints.after_commit`, on PostgreSQL, SQLite and MariaDB.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import typing as t
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from werkzeug.test import TestResponse

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import current_session
from flask_ploints._samples import build_event
from flask_ploints.stores import InspectableStore
from flask_ploints.stores import StoredEvent
from flask_ploints.testing import PlointsClient

from .support import SECRET
from .support import build_app

#: The databases the store is tested on, as parametrize ids.
DATABASES = ["postgresql", "sqlite", "mariadb"]
#: The longest any bounded wait of these tests may take.
WAIT = 15.0
PROCESSED = {"received": True}
DUPLICATE = {"received": True, "duplicate": True}
#: What a handler does after writing its row.
Mode = t.Literal["ok", "raise", "commit", "connection commit", "raw commit", "swallow"]


def database_url(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> str:
    """The URL of the database ``name`` (one of :data:`DATABASES`); SQLite
    is a file in ``tmp_path``, the others need their service.
    """
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    fixture = {"postgresql": "postgres_url", "mariadb": "mariadb_url"}[name]
    url: str = request.getfixturevalue(fixture)
    return url


def answer(response: TestResponse) -> tuple[int, t.Any]:
    """A response's status and JSON body."""
    return response.status_code, response.get_json()


def model(table: str) -> type[DeclarativeBase]:
    """The app's one model, an award per event, in table ``table``; a
    class of its own base per app, so apps never share a mapping.
    """

    class Base(DeclarativeBase):
        pass

    class Award(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        event_id: Mapped[str] = mapped_column(sa.String(64))

    return Award


def body(event_id: str) -> bytes:
    """A signed-to-be event body with ``event_id``, the same bytes each time."""
    return json.dumps(build_event("points.earned", {"amount": 5}, id=event_id)).encode()


class Shop:
    """An app on the database at ``url`` with Flask-SQLAlchemy
    (``db.init_app(app)``, then ``PlointsWebhooks(app)``) and
    ``PLOINTS_DEDUPE_STORE = db`` unless ``config`` says otherwise; its
    model's table is ``<table>_awards``, the dedupe table ``<table>``. Its
    one handler writes an award through ``db.session`` and flushes it, then
    does what :attr:`mode` says.

    :param db: the app's extension, made before it (default: a new one).
    :param engine_options: passed to Flask-SQLAlchemy's engine.
    """

    def __init__(
        self,
        url: str,
        table: str,
        db: SQLAlchemy | None = None,
        engine_options: dict[str, t.Any] | None = None,
        **config: t.Any,
    ) -> None:
        self.db = db if db is not None else SQLAlchemy()
        self.model = model(f"{table}_awards")
        self.table = table
        self.app = Flask("ploints_session_test")
        self.app.testing = True
        self.app.config.update(
            SQLALCHEMY_DATABASE_URI=url,
            SQLALCHEMY_ENGINE_OPTIONS=engine_options or {},
            PLOINTS_WEBHOOK_SECRET=SECRET,
            PLOINTS_DEDUPE_STORE=self.db,
            PLOINTS_SQL_TABLE=table,
        )
        self.app.config.update(config)
        self.db.init_app(self.app)
        self.webhooks = PlointsWebhooks(self.app)
        self.webhooks.on_any(self.handle)
        #: ``"raise"``: the handler raises after its write; ``"commit"``: it
        #: commits the session (``"connection commit"``: its connection;
        #: ``"raw commit"``: a ``COMMIT`` statement), then writes a second
        #: row; ``"swallow"``: it writes a row of a taken id, and swallows the
        #: ``IntegrityError``.
        self.mode: Mode = "ok"
        #: Seconds the handler sleeps after its write.
        self.delay = 0.0
        #: When set, the next run waits for it (at most :data:`WAIT`) after
        #: its write, once :attr:`inside` is set.
        self.gate: threading.Event | None = None
        self.inside = threading.Event()
        #: Every event id the handler ran for, in order.
        self.runs: list[str] = []
        #: Called with the event after the write, before :attr:`mode` acts.
        self.then: t.Callable[[Event], object] = lambda event: None
        with self.app.app_context():
            self.model.metadata.create_all(self.db.engine)
        self.sender = PlointsClient(self.app)

    def handle(self, event: Event) -> None:
        self.runs.append(event.id)
        self.db.session.add(self.model(event_id=event.id))
        self.db.session.flush()
        self.then(event)
        gate, self.gate = self.gate, None
        if gate is not None:
            self.inside.set()
            gate.wait(WAIT)
        time.sleep(self.delay)
        if self.mode == "raise":
            raise RuntimeError(f"broken on {event.id}")
        if self.mode == "swallow":
            taken = self.db.session.scalars(sa.select(self.model.id).limit(1)).one()
            self.db.session.add(self.model(id=taken, event_id="taken"))
            with contextlib.suppress(sa.exc.IntegrityError):
                self.db.session.flush()
        if self.mode in ("commit", "connection commit", "raw commit"):
            with warnings.catch_warnings():
                # SQLAlchemy warns that the session's connection committed
                # under it: an error under this suite's filterwarnings.
                warnings.simplefilter("ignore", sa.exc.SAWarning)
                if self.mode == "commit":
                    self.db.session.commit()
                elif self.mode == "connection commit":
                    self.db.session.connection().commit()
                else:
                    self.db.session.execute(sa.text("COMMIT"))
                self.db.session.add(self.model(event_id=f"{event.id} after the commit"))
                self.db.session.flush()

    def rows(self) -> list[str]:
        """The event ids of the awards committed, in order of writing."""
        table = self.model.__table__
        query = sa.select(table.c.event_id).order_by(table.c.id)
        with self.app.app_context(), self.db.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def stored(self, event_id: str) -> StoredEvent | None:
        """What the dedupe store holds for ``event_id``."""
        with self.app.app_context():
            return self.store.get(event_id)

    @property
    def store(self) -> InspectableStore:
        store = self.app.extensions["ploints"]["ploints"].store
        assert isinstance(store, InspectableStore)
        return store

    def close(self) -> None:
        """Drop both tables and close the engine's connections."""
        with self.app.app_context():
            engine = self.db.engine
            try:
                self.model.metadata.drop_all(engine)
                with engine.begin() as connection:
                    connection.execute(sa.text(f"DROP TABLE IF EXISTS {self.table}"))
            finally:
                engine.dispose()


class Plain:
    """An app without Flask-SQLAlchemy: ``PLOINTS_DEDUPE_STORE`` is
    ``sessions`` (a ``sessionmaker`` or ``scoped_session`` on ``engine``),
    and its handler writes an award through ``session()``, then raises
    while :attr:`broken`.
    """

    def __init__(
        self, engine: sa.Engine, table: str, sessions: t.Any, session: t.Callable[[], Session]
    ) -> None:
        self.engine = engine
        self.model = model(f"{table}_awards")
        self.model.metadata.create_all(engine)
        self.broken = False
        self.sessions: list[Session] = []
        self.app, webhooks = build_app(
            {"PLOINTS_DEDUPE_STORE": sessions, "PLOINTS_SQL_TABLE": table}
        )

        @webhooks.on_any
        def award(event: Event) -> None:
            self.sessions.append(session())
            session().add(self.model(event_id=event.id))
            session().flush()
            if self.broken:
                raise RuntimeError("broken")

    def check_exactly_once(self) -> None:
        """A failure leaves nothing; the retry writes once; then duplicates."""
        sender = PlointsClient(self.app)
        self.broken = True
        assert sender.post(body("evt_1")).status_code == 500
        assert self.rows() == []
        self.broken = False
        assert answer(sender.post(body("evt_1"))) == (200, PROCESSED)
        assert answer(sender.post(body("evt_1"))) == (200, DUPLICATE)
        assert self.rows() == ["evt_1"]
        with pytest.raises(RuntimeError, match=r"^current_session\(\) works in the handlers"):
            current_session()

    def rows(self) -> list[str]:
        table = self.model.__table__
        with self.engine.connect() as connection:
            return list(connection.execute(sa.select(table.c.event_id)).scalars())

    def close(self, table: str) -> None:
        try:
            self.model.metadata.drop_all(self.engine)
            with self.engine.begin() as connection:
                connection.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        finally:
            self.engine.dispose()
