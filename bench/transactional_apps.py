"""The receivers that ``bench/transactional_bench.py`` and ``bench/soak.py``
run under gunicorn (and the soak's Celery workers), both writing one row per
event in the app's own database through Flask-SQLAlchemy.

Gunicorn loads ``transactional_apps:create_app()`` (with ``--chdir bench``);
a Celery worker loads ``transactional_apps:celery``. The environment picks
the receiver:

``BENCH_KIND``
    ``extension``: :class:`~flask_ploints.PlointsWebhooks` with
    ``PLOINTS_DEDUPE_STORE = db`` (the :class:`~flask_ploints.stores.SessionStore`)
    and a handler that adds one ``Award`` row through ``db.session``; or
    ``twin``: the same receiver written by hand, the way the Flask-SQLAlchemy
    docs would have it: verify the HMAC in constant time, parse the JSON,
    then one transaction on ``db.session``: ``INSERT`` the event id ``ON
    CONFLICT DO NOTHING``, if a row went in add the same ``Award``,
    ``COMMIT``; ``200`` either way (``"duplicate": true`` when not inserted).
``BENCH_DB_URL``
    the SQLAlchemy URL (PostgreSQL or SQLite).
``BENCH_NAMESPACE``
    a name only this run uses: the tables are ``<namespace>_awards``,
    ``<namespace>_events`` (the extension's) and ``<namespace>_seen`` (the
    twin's); also the Celery queue.
``BENCH_APP_NAME``
    optional: the PostgreSQL ``application_name`` of every connection, so
    the soak can terminate this app's connections and no one else's.
``BENCH_STORE``
    optional: ``sql`` gives the extension the plain (non-transactional)
    SQL store on the same database and a handler that commits its row.
``BENCH_PRE_PING``
    ``1`` to ping pooled connections before use (the soak, whose database
    connections get terminated); off for the bench, on both sides alike.
``BENCH_BROKER_URL``
    optional: with it, ``PLOINTS_DISPATCH = "celery"`` on this broker.

:func:`create_tables` and :func:`drop_tables` are for the driver, run before
gunicorn starts and after it stopped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask import jsonify
from flask import request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

SECRET = "whsec_bench_transactional"
URL = "/webhooks/ploints"
KINDS = ("extension", "twin")


def tables(metadata: sa.MetaData, namespace: str) -> tuple[sa.Table, sa.Table]:
    """The app's own table of awards, one row per processed event (no
    unique key on the event id: a doubled event shows as two rows), and the
    twin's table of seen event ids.
    """
    awards = sa.Table(
        f"{namespace}_awards",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, index=True),
        sa.Column("customer", sa.String(200), nullable=False),
        sa.Column("points", sa.Integer, nullable=False),
    )
    seen = sa.Table(
        f"{namespace}_seen",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
    )
    return awards, seen


def _engine_options(url: str, app_name: str | None, pre_ping: bool) -> dict[str, t.Any]:
    options: dict[str, t.Any] = {"pool_pre_ping": pre_ping}
    if url.startswith("postgresql") and app_name:
        options["connect_args"] = {"application_name": app_name}
    return options


def _base_app(name: str, url: str, namespace: str) -> tuple[Flask, SQLAlchemy, sa.Table, sa.Table]:
    app = Flask(name)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = _engine_options(
        url, os.environ.get("BENCH_APP_NAME"), os.environ.get("BENCH_PRE_PING") == "1"
    )
    db = SQLAlchemy()
    db.init_app(app)
    awards, seen = tables(db.metadata, namespace)
    return app, db, awards, seen


def _award_row(awards: sa.Table, event_id: str, data: t.Mapping[str, t.Any]) -> t.Any:
    return sa.insert(awards).values(
        event_id=event_id, customer=str(data["customerEmail"]), points=int(data["amount"])
    )


def _celery(app: Flask, broker_url: str, queue: str) -> t.Any:
    """Flask's "Background Tasks with Celery" pattern: tasks run in an app
    context, the Celery app in ``app.extensions["celery"]``.
    """
    from celery import Celery
    from celery import Task

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.conf.update(
        broker_url=broker_url,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
    )
    app.extensions["celery"] = celery_app
    app.config["PLOINTS_CELERY_QUEUE"] = queue
    return celery_app


def extension_app(url: str, namespace: str, latest_by: bool = False) -> Flask:
    """The extension with ``PLOINTS_DEDUPE_STORE = db`` and one handler that
    writes one row through ``db.session`` and does not commit; with
    ``latest_by``, registered with ``latest_by`` the customer's email.
    """
    app, db, awards, _ = _base_app("bench_extension", url, namespace)
    app.config["PLOINTS_WEBHOOK_SECRET"] = SECRET
    # ``sql``: the non-transactional SQLAlchemyStore on the same database,
    # the handler committing its own write; the soak's control, which shows
    # the doubles the SessionStore prevents.
    plain = os.environ.get("BENCH_STORE") == "sql"
    app.config["PLOINTS_DEDUPE_STORE"] = url if plain else db
    app.config["PLOINTS_SQL_TABLE"] = f"{namespace}_events"
    broker_url = os.environ.get("BENCH_BROKER_URL")
    if broker_url:
        app.config["PLOINTS_DISPATCH"] = "celery"
        # The worker's retries, in the soak's compressed time: a few
        # seconds apart, within a lease that a lost worker's claim outlives
        # only briefly.
        app.config["PLOINTS_CELERY_RETRY_BACKOFF"] = 1.0
        app.config["PLOINTS_CELERY_RETRY_BACKOFF_MAX"] = 5.0
        app.config["PLOINTS_CELERY_LEASE"] = 60.0
        _celery(app, broker_url, namespace)
    webhooks = PlointsWebhooks(app)

    ordered = {"latest_by": lambda event: event.data["customerEmail"]} if latest_by else {}

    @webhooks.on("points.earned", **ordered)
    def award(event: Event) -> None:
        db.session.execute(_award_row(awards, event.id, event.data))
        if plain:
            db.session.commit()

    return app


def twin_app(url: str, namespace: str) -> Flask:
    """The hand-written transactional receiver."""
    app, db, awards, seen = _base_app("bench_twin", url, namespace)
    secret = SECRET.encode()
    upsert = postgresql.insert if url.startswith("postgresql") else sqlite.insert

    @app.post(URL)
    def receive() -> t.Any:
        raw = request.get_data()
        expected = hmac.new(secret, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Ploints-Signature", ""), expected):
            return jsonify({"error": "invalid signature"}), 401
        event = json.loads(raw)
        try:
            # RETURNING: psycopg 3 under SQLAlchemy 2.1 reports no rowcount here.
            inserted = (
                db.session.execute(
                    upsert(seen)
                    .values(id=event["id"])
                    .on_conflict_do_nothing()
                    .returning(seen.c.id)
                ).first()
                is not None
            )
            if inserted and event["type"] == "points.earned":
                db.session.execute(_award_row(awards, event["id"], event["data"]))
            db.session.commit()
        except Exception:
            db.session.rollback()
            raise
        return jsonify({"received": True, "duplicate": not inserted})

    return app


def create_app() -> Flask:
    """Build the receiver the ``BENCH_*`` environment asks for."""
    kind = os.environ["BENCH_KIND"]
    url = os.environ["BENCH_DB_URL"]
    namespace = os.environ["BENCH_NAMESPACE"]
    if kind in ("extension", "latest_by"):
        return extension_app(url, namespace, latest_by=kind == "latest_by")
    if kind == "twin":
        return twin_app(url, namespace)
    raise ValueError(f"BENCH_KIND must be one of {KINDS}, not {kind!r}")


def __getattr__(name: str) -> t.Any:
    # ``celery -A transactional_apps:celery``: built on first access only,
    # so that gunicorn's import builds nothing twice.
    if name == "celery":
        return create_app().extensions["celery"]
    raise AttributeError(name)


def create_tables(url: str, namespace: str) -> None:
    """Create the run's tables (the extension's too) before any worker
    starts, so no worker races to create them; SQLite files go to WAL.
    """
    engine = sa.create_engine(url)
    try:
        metadata = sa.MetaData()
        tables(metadata, namespace)
        with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            metadata.create_all(connection)
        from flask_ploints.stores import SQLAlchemyStore

        store = SQLAlchemyStore(engine, table_name=f"{namespace}_events")
        store.create_table()
    finally:
        engine.dispose()


def drop_tables(url: str, namespace: str) -> None:
    """Drop every table of the run."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for suffix in ("awards", "seen", "events"):
                connection.exec_driver_sql(f"DROP TABLE IF EXISTS {namespace}_{suffix}")
    finally:
        engine.dispose()
