"""An app whose tier handler is registered with ``latest_by``, on each store
that keeps the order, for the tests of :mod:`flask_ploints._ordering`.

Run as ``python -m tests.ordering_app KIND URL TABLE SECONDS BASE`` it is another
process: it delivers one ``customer.tier_changed`` event for
``jane@example.com`` stamped ``SECONDS`` after ``BASE``, and prints the
answer's status and the tiers its handler applied, as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import typing as t
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints.testing import PlointsClient

from .support import SECRET

#: The stores the guarantee is tested on: the store and, after a dash, the
#: database. ``db-`` is ``PLOINTS_DEDUPE_STORE = db`` (Flask-SQLAlchemy).
KINDS = [
    "memory",
    "redis",
    "sql-postgresql",
    "sql-mariadb",
    "sql-sqlite",
    "db-sqlite",
    "db-postgresql",
]
EMAIL = "jane@example.com"


#: The time the tests' seconds count from: a day ago, well inside
#: ``PLOINTS_MAX_EVENT_AGE``. Another process is given it.
BASE = int(time.time()) - 86400


def stamp(seconds: int) -> datetime:
    """The aware datetime ``seconds`` after :data:`BASE`."""
    return datetime.fromtimestamp(BASE + seconds, tz=UTC)


class Loyalty:
    """An app with one ``latest_by`` handler, ``tier``, keyed by the
    customer's email, and an ``on_any`` audit. The tier handler appends
    ``(tier, seconds)`` to :attr:`applied` (with ``db-``, it also writes
    the tier and an applied row through ``db.session``), then raises while
    :attr:`broken`.

    :param kind: one of :data:`KINDS`.
    :param url: the store's URL (the database's, for ``sql-`` and ``db-``).
    :param table: names the dedupe table, the Redis prefix and the app's
        tables.
    """

    def __init__(self, kind: str, url: str, table: str, **config: t.Any) -> None:
        self.kind = kind
        self.table = table
        self.app = Flask("ploints_ordering_test")
        self.app.testing = True
        self.app.config.update(
            PLOINTS_WEBHOOK_SECRET=SECRET,
            PLOINTS_SQL_TABLE=table,
            PLOINTS_REDIS_PREFIX=f"{table}:",
        )
        self.db: SQLAlchemy | None = None
        if kind.startswith("db-"):
            self.db = SQLAlchemy()
            self.app.config.update(SQLALCHEMY_DATABASE_URI=url, PLOINTS_DEDUPE_STORE=self.db)
            self.db.init_app(self.app)
            self.tiers, self.applied_rows = _models(table)
        else:
            self.app.config["PLOINTS_DEDUPE_STORE"] = "memory" if kind == "memory" else url
        self.app.config.update(config)
        self.webhooks = PlointsWebhooks(self.app)
        #: ``(tier, seconds)`` of each event the tier handler ran for.
        self.applied: list[tuple[str, int]] = []
        #: The ids the audit handler saw.
        self.audited: list[str] = []
        self.broken = False
        #: Seconds the tier handler sleeps, to make deliveries overlap.
        self.delay = 0.0
        self._lock = threading.Lock()
        self.webhooks.on("customer.tier_changed", latest_by=lambda e: e.data["customerEmail"])(
            self.tier
        )
        self.webhooks.on_any(self.audit)
        if self.db is not None:
            with self.app.app_context():
                self.tiers.metadata.create_all(self.db.engine)
        self.sender = PlointsClient(self.app)

    def tier(self, event: Event) -> None:
        moment = round(event.timestamp.timestamp()) - BASE
        if self.db is not None:
            session = self.db.session
            session.merge(self.tiers(email=event.data["customerEmail"], tier=event.data["newTier"]))
            session.add(self.applied_rows(tier=event.data["newTier"], seconds=moment))
            session.flush()
        with self._lock:
            self.applied.append((event.data["newTier"], moment))
        time.sleep(self.delay)
        if self.broken:
            raise RuntimeError("broken")

    def audit(self, event: Event) -> None:
        with self._lock:
            self.audited.append(event.id)

    def send(self, tier: str, seconds: int, id: str | None = None) -> int:
        """Deliver a tier change to ``tier`` stamped ``seconds``; the status."""
        data = {"customerEmail": EMAIL, "previousTier": "bronze", "newTier": tier}
        response = self.sender.send("customer.tier_changed", data, id=id, timestamp=stamp(seconds))
        return response.status_code

    def committed(self) -> tuple[str | None, list[int]]:
        """With ``db-``: the tier stored for the customer, and the seconds of
        each applied row committed, in order of writing.
        """
        assert self.db is not None
        with self.app.app_context(), self.db.engine.connect() as connection:
            tier = connection.execute(sa.select(self.tiers.__table__.c.tier)).scalar()
            table = self.applied_rows.__table__
            rows = connection.execute(sa.select(table.c.seconds).order_by(table.c.id))
            return tier, list(rows.scalars())

    def close(self) -> None:
        """Drop the tables (with ``db-``) and close the store's connections."""
        store = self.webhooks.receiver(self.app).store
        close = getattr(store, "close", None)
        if close is not None and self.db is None:
            close()
            store.engine.dispose()
        if self.db is None:
            return
        with self.app.app_context():
            engine = self.db.engine
            try:
                self.tiers.metadata.drop_all(engine)
                with engine.begin() as connection:
                    for name in (self.table, f"{self.table}_order"):
                        connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
            finally:
                engine.dispose()


def store_url(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> str:
    """The URL a :class:`Loyalty` of ``kind`` needs; SQLite is a file in
    ``tmp_path``, the others need their service.
    """
    if kind == "memory":
        return "memory"
    database = kind.partition("-")[2]
    if database == "sqlite":
        return f"sqlite:///{tmp_path / 'ordering.db'}"
    fixture = {"redis": "redis_url", "postgresql": "postgres_url", "mariadb": "mariadb_url"}
    url: str = request.getfixturevalue(fixture[database or kind])
    return url


def clean(kind: str, url: str, table: str) -> None:
    """Remove what the stores of ``kind`` kept under ``table``."""
    if kind == "redis":
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{table}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    elif kind.startswith("sql-"):
        engine = sa.create_engine(url)
        with engine.begin() as connection:
            for name in (table, f"{table}_order"):
                connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        engine.dispose()


def _models(table: str) -> tuple[type[t.Any], type[t.Any]]:
    class Base(DeclarativeBase):
        pass

    class Tier(Base):
        __tablename__ = f"{table}_tiers"
        email: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
        tier: Mapped[str] = mapped_column(sa.String(16))

    class Applied(Base):
        __tablename__ = f"{table}_applied"
        id: Mapped[int] = mapped_column(primary_key=True)
        tier: Mapped[str] = mapped_column(sa.String(16))
        seconds: Mapped[int] = mapped_column(sa.BigInteger())

    return Tier, Applied


def main(argv: list[str]) -> None:
    global BASE
    kind, url, table, seconds, base = argv
    BASE = int(base)
    loyalty = Loyalty(kind, url, table)
    status = loyalty.send(f"tier{seconds}", int(seconds))
    print(json.dumps({"status": status, "applied": loyalty.applied}))
    if loyalty.db is not None:
        with loyalty.app.app_context():
            loyalty.db.engine.dispose()


if __name__ == "__main__":
    # The handler's name is its module's: tests.ordering_app, not __main__.
    from tests import ordering_app

    ordering_app.main(sys.argv[1:])
