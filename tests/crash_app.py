"""The app that ``tests/test_exactly_once.py`` runs under real gunicorn
workers and real Celery workers: Flask-SQLAlchemy, with the dedupe record in
the app's own database (``PLOINTS_DEDUPE_STORE = db``).

Gunicorn loads it with ``tests.crash_app:create_app()``, a Celery worker
with ``-A tests.crash_app:celery``; the test process builds the same app
with :func:`create_app` to set up the tables and read the results.
Everything comes from environment variables (:func:`environment` builds
them), so each test or server has its own tables, queue and markers:

``PLOINTS_CRASH_DB``
    the app's ``SQLALCHEMY_DATABASE_URI``.
``PLOINTS_CRASH_NAME``
    a name only this server or test uses: the credits table, the store's
    table is ``NAME_events``, and the Celery queue.
``PLOINTS_CRASH_STORE``
    ``db`` (the default) for the :class:`~flask_ploints.stores.SessionStore`,
    whose handlers only flush; a store URL for a non-transactional store,
    whose handler commits its own write, as handlers must without it.
``PLOINTS_CRASH_SPEED``
    with a store URL, how many times faster than real time the store's
    clock runs (default 1): the sender's retries are compressed in time, and
    so must the claim's lease be, which cannot be set under 10 s.
``PLOINTS_CRASH_HOLD_LIMIT``
    with the session store, its ``transaction_timeout`` in seconds (default:
    the store's own, 8).
``PLOINTS_CRASH_MARKERS``
    a directory every process of the test shares: the journal of handler
    starts and one marker per event whose crash happened.
``PLOINTS_CRASH_DEATH``
    ``kill`` (the default) for a SIGKILL of the process, ``exit`` for
    ``os._exit(1)``.
``PLOINTS_CRASH_BROKER``
    when set, ``PLOINTS_DISPATCH = "celery"`` on that broker.
``PLOINTS_CRASH_CONFIG``
    more config keys, as a JSON object.

The handler writes one :class:`Credit` row per event through ``db.session``.
When the event's data holds ``"crash"`` and no marker exists for the event
yet, it creates the marker (with its pid) and fails at that point:
``"before"`` its write, ``"inside"`` after it (flushed, or committed by the
handler itself with a non-transactional store), ``"after_commit"`` just
after the event's commit (:func:`flask_ploints.after_commit`), all three by
killing its own process; ``"raise"`` raises after the write, and
``"always"`` does so on every attempt, not only the first. With
``"sleep": seconds`` it sleeps that long after its write, on every attempt. So only the
first attempt at an event fails, and the retry goes through.
"""

from __future__ import annotations

import json
import os
import signal
import time
import typing as t
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import after_commit
from flask_ploints.stores import InspectableStore
from flask_ploints.stores import SessionStore
from flask_ploints.stores import SQLAlchemyStore

from .gunicorn_app import SECRET as FAULTS_SECRET

#: The secret both the app and the tests sign with: the one of
#: :mod:`tests.gunicorn_app`, which the tests' sender signs with.
SECRET = FAULTS_SECRET

#: Where a crash happens: see the module's docstring.
CRASHES = ("before", "inside", "after_commit", "raise")


def environment(
    database: str,
    name: str,
    markers: Path,
    *,
    store: str = "db",
    speed: float = 1.0,
    death: str = "kill",
    broker: str | None = None,
    config: t.Mapping[str, t.Any] | None = None,
) -> dict[str, str]:
    """The ``PLOINTS_CRASH_*`` variables of one app; see the module."""
    env = {
        "PLOINTS_CRASH_DB": database,
        "PLOINTS_CRASH_NAME": name,
        "PLOINTS_CRASH_STORE": store,
        "PLOINTS_CRASH_SPEED": str(speed),
        "PLOINTS_CRASH_MARKERS": str(markers),
        "PLOINTS_CRASH_DEATH": death,
        "PLOINTS_CRASH_CONFIG": json.dumps(dict(config or {})),
    }
    if broker is not None:
        env["PLOINTS_CRASH_BROKER"] = broker
    return env


class Journal:
    """What the handlers did, in files under ``directory`` that every
    process can append to: ``starts`` (one line per handler run) and one
    marker file per event whose crash happened.

    :param directory: the shared directory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.crash_dir = directory / "crashes"

    def start(self, event_id: str) -> None:
        """Record that a handler began to run ``event_id``."""
        # One write to an O_APPEND file: lines of processes never interleave.
        with (self.directory / "starts").open("a") as starts:
            starts.write(f"{event_id} {os.getpid()}\n")

    def first_crash(self, event_id: str) -> bool:
        """Create the crash marker of ``event_id``; ``False`` when it exists."""
        try:
            marker = os.open(self.crash_dir / event_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        try:
            os.write(marker, str(os.getpid()).encode())
        finally:
            os.close(marker)
        return True

    def starts(self) -> Counter[str]:
        """How many times a handler began to run each event id."""
        path = self.directory / "starts"
        lines = path.read_text().splitlines() if path.exists() else []
        return Counter(line.split()[0] for line in lines)

    def crashes(self) -> dict[str, int]:
        """The pid of the process that crashed on each event id."""
        return {path.name: int(path.read_text()) for path in self.crash_dir.iterdir()}


def _die(how: str) -> None:
    if how == "exit":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGKILL)


def create_app(env: t.Mapping[str, str] | None = None) -> Flask:
    """Build the app from the ``PLOINTS_CRASH_*`` variables of ``env``
    (default: the environment).
    """
    env = os.environ if env is None else env
    name = env["PLOINTS_CRASH_NAME"]
    transactional = env.get("PLOINTS_CRASH_STORE", "db") == "db"
    death = env.get("PLOINTS_CRASH_DEATH", "kill")
    journal = Journal(Path(env["PLOINTS_CRASH_MARKERS"]))

    # Metadata of its own: the test process builds several apps.
    class AppBase(DeclarativeBase):
        metadata = sa.MetaData()

    db = SQLAlchemy(model_class=AppBase)

    class Credit(AppBase):
        """One credit of loyalty points, the handler's write."""

        __tablename__ = name
        id: Mapped[int] = mapped_column(primary_key=True)
        event_id: Mapped[str] = mapped_column(sa.String(255), index=True)
        points: Mapped[int]
        pid: Mapped[int]

    app = Flask("ploints_session")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=env["PLOINTS_CRASH_DB"],
        PLOINTS_WEBHOOK_SECRET=SECRET,
        PLOINTS_DEDUPE_STORE=db,
        PLOINTS_SQL_TABLE=f"{name}_events",
    )
    limit = env.get("PLOINTS_CRASH_HOLD_LIMIT")
    if transactional and limit is not None:
        app.config["PLOINTS_DEDUPE_STORE"] = SessionStore(
            db.session, table_name=f"{name}_events", transaction_timeout=float(limit)
        )
    if not transactional:
        speed = float(env.get("PLOINTS_CRASH_SPEED", "1"))
        app.config["PLOINTS_DEDUPE_STORE"] = SQLAlchemyStore.from_url(
            env["PLOINTS_CRASH_STORE"],
            table_name=f"{name}_events",
            clock=lambda: time.time() * speed,
        )
    broker = env.get("PLOINTS_CRASH_BROKER")
    if broker is not None:
        from .celery_flask import celery_init_app
        from .celery_flask import celery_settings

        app.config.update(
            PLOINTS_DISPATCH="celery",
            PLOINTS_CELERY_QUEUE=name,
            CELERY=celery_settings(broker),
        )
        celery_init_app(app)
    app.config.update(json.loads(env.get("PLOINTS_CRASH_CONFIG", "{}")))
    db.init_app(app)
    webhooks = PlointsWebhooks(app)
    app.extensions["crash_test"] = (db, Credit)

    @webhooks.on_any
    def credit(event: Event) -> None:
        journal.start(event.id)
        crash = event.data.get("crash")
        first = crash in CRASHES and journal.first_crash(event.id)
        if first and crash == "before":
            _die(death)
        points = int(event.data.get("amount", 0))
        db.session.add(Credit(event_id=event.id, points=points, pid=os.getpid()))
        if transactional:
            db.session.flush()
        else:
            db.session.commit()
        if event.data.get("sleep"):
            time.sleep(float(event.data["sleep"]))
        if first and crash == "inside":
            _die(death)
        if first and crash == "after_commit":
            after_commit(_die, death)
        if (first and crash == "raise") or crash == "always":
            raise RuntimeError(f"handler broke on purpose on {event.id}")

    return app


def prepare(app: Flask) -> None:
    """Create the credits table and the store's table (the test calls this
    before any worker starts, so no two workers race to create them).
    """
    db, _ = app.extensions["crash_test"]
    with app.app_context():
        db.create_all()
        # The first use of the store creates its table.
        assert store(app).get("evt_none") is None


def store(app: Flask) -> InspectableStore:
    """The app's dedupe store, to read in an app context."""
    found = app.extensions["ploints"]["ploints"].store
    assert isinstance(found, InspectableStore)
    return found


def credit_pids(app: Flask) -> dict[str, list[int]]:
    """The pid of the process that wrote each credit row, by event id: as
    many pids as the event has rows.
    """
    db, credit = app.extensions["crash_test"]
    with app.app_context():
        rows = db.session.execute(sa.select(credit.event_id, credit.pid).order_by(credit.id)).all()
    found: dict[str, list[int]] = {}
    for event_id, pid in rows:
        found.setdefault(event_id, []).append(int(pid))
    return found


def drop(app: Flask) -> None:
    """Drop both tables and dispose of the engines."""
    db, _ = app.extensions["crash_test"]
    with app.app_context():
        plain = store(app)
        if isinstance(plain, SQLAlchemyStore):
            plain.close()
            plain.engine.dispose()
        db.drop_all()
        table = app.config["PLOINTS_SQL_TABLE"]
        with db.engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        db.engine.dispose()


if "PLOINTS_CRASH_BROKER" in os.environ and "PLOINTS_CRASH_NAME" in os.environ:
    flask_app = create_app()
    celery = flask_app.extensions["celery"]
