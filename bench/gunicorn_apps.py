"""The receivers that ``bench/gunicorn_bench.py`` runs under gunicorn.

Gunicorn loads ``gunicorn_apps:create_app()`` (with ``--chdir bench``); the
environment picks the receiver:

``BENCH_KIND``
    ``extension`` (:class:`~flask_ploints.PlointsWebhooks`) or ``hand``
    (the sender's Node example written in Flask, with the same store work
    done the plain way: on a SQL database, on the driver's own autocommit
    connection); ``core``: the same, on a SQL database, as a Flask user
    writes it with SQLAlchemy Core (``engine.begin()`` around each of the
    two statements); or ``tier`` and ``latest_by``: the extension with
    one handler of ``customer.tier_changed`` that keeps each customer's
    tier, registered without and with ``latest_by``.
``BENCH_STORE``
    ``memory``, ``redis``, ``postgresql`` or ``mariadb``; or ``celery``: dedupe in Redis
    and hand each event to Celery (``PLOINTS_DISPATCH = "celery"``), which
    answers ``202`` once RabbitMQ confirmed the task.
``BENCH_NAMESPACE``
    a name only this run uses: the Redis key prefix and the SQL table.
``BENCH_REDIS_URL``, ``BENCH_POSTGRES_URL``, ``BENCH_MARIADB_URL``, ``BENCH_BROKER_URL``
    where the services are.

Both kinds verify the signature over the raw body, parse the JSON, dedupe on
the event id with a claim before the handler and a mark after it, run one
no-op handler for ``points.earned`` and answer ``{"received": true}``.
With ``celery`` both claim the id in Redis, publish one task to a queue of
their own with publisher confirms on (nothing consumes it), and answer
``202``; the handlers would run in a worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import typing as t
import warnings

from flask import Flask
from flask import jsonify
from flask import request

from flask_ploints import Event
from flask_ploints import PlointsWarning
from flask_ploints import PlointsWebhooks

SECRET = "whsec_bench_gunicorn"
URL = "/webhooks/ploints"
LEASE = 30
RETENTION = 7 * 24 * 3600
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
TASK_NAME = "flask_ploints.process_event"


def celery_app(namespace: str) -> t.Any:
    """A Celery app for the broker, routing every task to ``namespace``."""
    from celery import Celery

    app = Celery("bench", broker=BROKER_URL)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=namespace,
        broker_transport_options={"confirm_publish": True},
    )
    return app


def _handle(event_id: str) -> None:
    """The handler's work: none, so the receiver itself is measured."""


def extension_app(store: str, namespace: str, tier: str = "") -> Flask:
    """The extension, with its store chosen by URL as in production; with
    ``tier`` (``"tier"`` or ``"latest_by"``), a tier handler as well.
    """
    app = Flask("bench_extension")
    app.config["PLOINTS_WEBHOOK_SECRET"] = SECRET
    app.config["PLOINTS_DEDUPE_STORE"] = {
        "memory": "memory",
        "redis": REDIS_URL,
        "postgresql": POSTGRES_URL,
        "mariadb": MARIADB_URL,
        "celery": REDIS_URL,
    }[store]
    app.config["PLOINTS_REDIS_PREFIX"] = f"{namespace}:"
    app.config["PLOINTS_SQL_TABLE"] = namespace
    if store == "celery":
        app.config["PLOINTS_DISPATCH"] = "celery"
        app.config["PLOINTS_CELERY_APP"] = celery_app(namespace)
    with warnings.catch_warnings():
        # MemoryStore outside testing warns that it dedupes per process;
        # known, and the same holds for the hand-written dict.
        warnings.simplefilter("ignore", PlointsWarning)
        webhooks = PlointsWebhooks(app)

    @webhooks.on("points.earned")
    def award(event: Event) -> None:
        _handle(event.id)

    if tier:
        tiers: dict[str, str] = {}
        options: dict[str, t.Any] = {}
        if tier == "latest_by":
            options = {"latest_by": lambda event: event.data["customerEmail"], "name": "tier"}

        @webhooks.on("customer.tier_changed", **options)
        def keep_tier(event: Event) -> None:
            tiers[event.data["customerEmail"]] = event.data["newTier"]

    return app


class _Dedupe(t.Protocol):
    def claim(self, event_id: str) -> str | None: ...

    def done(self, event_id: str) -> None: ...


class _DictDedupe:
    """A dict: the plain in-process way."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def claim(self, event_id: str) -> str | None:
        status = self.seen.get(event_id)
        if status is None:
            self.seen[event_id] = "in_flight"
        return status

    def done(self, event_id: str) -> None:
        self.seen[event_id] = "done"


class _RedisDedupe:
    """``SET NX`` with a lease, then ``SET`` done with the retention."""

    def __init__(self, namespace: str) -> None:
        import redis

        self.client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        self.prefix = f"{namespace}:"

    def claim(self, event_id: str) -> str | None:
        key = self.prefix + event_id
        if self.client.set(key, b"in_flight", nx=True, ex=LEASE):
            return None
        value = self.client.get(key)
        return "done" if value == b"done" else "in_flight"

    def done(self, event_id: str) -> None:
        self.client.set(self.prefix + event_id, b"done", ex=RETENTION)


class _PostgresDedupe:
    """``INSERT ... ON CONFLICT DO NOTHING``, then ``UPDATE``, with psycopg
    on one autocommit connection per thread (per process under sync).
    """

    def __init__(self, namespace: str) -> None:
        self._local = threading.local()
        # The table is created by the bench before the workers start.
        self.table = namespace

    @property
    def connection(self) -> t.Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def _connect(self) -> t.Any:
        import psycopg

        return psycopg.connect(POSTGRES_URL, autocommit=True)

    def claim(self, event_id: str) -> str | None:
        cursor = self.connection.execute(
            f"INSERT INTO {self.table} (id, status) VALUES (%s, 'in_flight')"
            " ON CONFLICT DO NOTHING",
            (event_id,),
        )
        if cursor.rowcount == 1:
            return None
        row = self.connection.execute(
            f"SELECT status FROM {self.table} WHERE id = %s",
            (event_id,),
        ).fetchone()
        return "in_flight" if row is None else str(row[0])

    def done(self, event_id: str) -> None:
        self.connection.execute(
            f"UPDATE {self.table} SET status = 'done' WHERE id = %s",
            (event_id,),
        )


class _MariaDBDedupe(_PostgresDedupe):
    """``INSERT IGNORE``, then ``UPDATE``, with PyMySQL on one autocommit
    connection per thread (per process under sync).
    """

    def _connect(self) -> t.Any:
        import pymysql

        url = sa_url(MARIADB_URL)
        return pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            database=url.database,
            autocommit=True,
        )

    def _execute(self, sql: str, event_id: str) -> t.Any:
        cursor = self.connection.cursor()
        cursor.execute(sql, (event_id,))
        return cursor

    def claim(self, event_id: str) -> str | None:
        if (
            self._execute(
                f"INSERT IGNORE INTO {self.table} (id, status) VALUES (%s, 'in_flight')", event_id
            ).rowcount
            == 1
        ):
            return None
        row = self._execute(f"SELECT status FROM {self.table} WHERE id = %s", event_id).fetchone()
        return "in_flight" if row is None else str(row[0])

    def done(self, event_id: str) -> None:
        self._execute(f"UPDATE {self.table} SET status = 'done' WHERE id = %s", event_id)


def sa_url(url: str) -> t.Any:
    """``url`` parsed by SQLAlchemy, a ``postgresql://`` one with psycopg 3."""
    import sqlalchemy as sa

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return sa.make_url(url)


class _CoreDedupe:
    """The same two statements through SQLAlchemy Core, as a Flask user
    writes them: ``INSERT ... ON CONFLICT DO NOTHING`` (``INSERT IGNORE`` on
    MariaDB), then ``UPDATE``, each in ``engine.begin()``, on the engine's
    default pool.
    """

    def __init__(self, store: str, namespace: str) -> None:
        import sqlalchemy as sa

        self.engine = sa.create_engine(
            sa_url(POSTGRES_URL if store == "postgresql" else MARIADB_URL)
        )
        table = sa.table(namespace, sa.column("id"), sa.column("status"))
        self.table = table
        if store == "postgresql":
            from sqlalchemy.dialects.postgresql import insert

            inserting: t.Any = insert(table).on_conflict_do_nothing()
        else:
            inserting = sa.insert(table).prefix_with("IGNORE")
        self.insert = inserting.execution_options(preserve_rowcount=True)
        self.select = sa.select(table.c.status)
        self.update = sa.update(table).values(status="done")

    def claim(self, event_id: str) -> str | None:
        with self.engine.begin() as connection:
            inserted = connection.execute(self.insert, {"id": event_id, "status": "in_flight"})
            if inserted.rowcount == 1:
                return None
            status = connection.execute(self.select.where(self.table.c.id == event_id)).scalar()
        return "in_flight" if status is None else str(status)

    def done(self, event_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(self.update.where(self.table.c.id == event_id))


def hand_written_app(store: str, namespace: str, core: bool = False) -> Flask:
    """The sender's Node example in Flask, with the store work done plainly;
    with ``core``, through SQLAlchemy Core.
    """
    app = Flask("bench_hand")
    secret = SECRET.encode()
    # Connected lazily, in the worker process.
    dedupes: list[_Dedupe] = []
    queue = celery_app(namespace) if store == "celery" else None

    def dedupe() -> _Dedupe:
        if not dedupes:
            made: _Dedupe
            if store in ("redis", "celery"):
                made = _RedisDedupe(namespace)
            elif core:
                made = _CoreDedupe(store, namespace)
            elif store == "postgresql":
                made = _PostgresDedupe(namespace)
            elif store == "mariadb":
                made = _MariaDBDedupe(namespace)
            else:
                made = _DictDedupe()
            dedupes.append(made)
        return dedupes[0]

    @app.post(URL)
    def receive() -> t.Any:
        signature = request.headers.get("X-Ploints-Signature", "")
        raw = request.get_data()
        expected = hmac.new(secret, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            return jsonify({"error": "Invalid signature"}), 401
        event = json.loads(raw)
        status = dedupe().claim(event["id"])
        if status == "done":
            return jsonify({"received": True, "duplicate": True})
        if status is not None:
            return jsonify({"error": "event is being processed"}), 409
        if queue is not None:
            # The worker runs the handlers and marks the id done.
            queue.send_task(TASK_NAME, args=(raw.decode(),))
            return jsonify({"received": True, "queued": True}), 202
        if event["type"] == "points.earned":
            _handle(event["id"])
        elif event["type"] == "customer.created":
            pass
        dedupe().done(event["id"])
        return jsonify({"received": True})

    return app


def create_app() -> Flask:
    """Build the receiver the ``BENCH_*`` environment asks for."""
    kind = os.environ["BENCH_KIND"]
    store = os.environ["BENCH_STORE"]
    namespace = os.environ["BENCH_NAMESPACE"]
    if kind == "extension":
        return extension_app(store, namespace)
    if kind in ("tier", "latest_by"):
        return extension_app(store, namespace, kind)
    return hand_written_app(store, namespace, core=kind == "core")
