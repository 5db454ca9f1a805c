"""The app that ``tests/test_faults.py`` runs under real gunicorn workers.

Gunicorn loads it with ``tests.gunicorn_app:create_app()``; everything the
app needs comes from environment variables, so each test can start servers on
its own store and namespace:

``PLOINTS_FAULTS_STORE``
    the ``PLOINTS_DEDUPE_STORE`` URL (``redis://...`` or ``postgresql://...``).
``PLOINTS_FAULTS_NAMESPACE``
    a name only this test uses: the Redis key prefix is ``NAMESPACE:store:``,
    the SQL table ``NAMESPACE_store``.
``PLOINTS_FAULTS_EFFECTS``
    where handler effects are recorded, shared by every worker process: a
    Redis URL (hashes ``NAMESPACE:fx`` and ``NAMESPACE:pid``) or a PostgreSQL
    URL (table ``NAMESPACE_fx``, which the test creates).
``PLOINTS_FAULTS_LEASE``
    ``PLOINTS_CLAIM_LEASE`` in seconds (default 30).

The handler records a ``start`` (with its pid) before it does anything, then,
when the event's data holds ``"hang": seconds`` and this is the first attempt
ever made at the event, sleeps that long, then records one ``effect``. Each
recorded effect stands for one time the event was processed.
"""

from __future__ import annotations

import os
import time
import typing as t

from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

#: The secret both the app and the tests sign with.
SECRET = "whsec_faults"


class Recorder(t.Protocol):
    """Where the handler writes what it did."""

    def start(self, event_id: str, pid: int) -> bool:
        """Record that a worker began to process ``event_id``; return
        ``True`` when no start was recorded for it before.
        """

    def effect(self, event_id: str) -> None:
        """Record that ``event_id`` was processed once more."""

    def effects(self) -> dict[str, int]:
        """Return how many times each event id was processed."""

    def pids(self) -> dict[str, int]:
        """Return the pid of the first worker that started each event id."""


class RedisRecorder:
    """Effects in two Redis hashes under ``namespace``.

    :param url: the Redis to write to.
    :param namespace: the per-test name.
    """

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.fx_key = f"{namespace}:fx"
        self.pid_key = f"{namespace}:pid"

    def start(self, event_id: str, pid: int) -> bool:
        """See :meth:`Recorder.start`."""
        return bool(self.client.hsetnx(self.pid_key, event_id, pid))

    def effect(self, event_id: str) -> None:
        """See :meth:`Recorder.effect`."""
        self.client.hincrby(self.fx_key, event_id, 1)

    def effects(self) -> dict[str, int]:
        """See :meth:`Recorder.effects`."""
        return _decoded(self.client.hgetall(self.fx_key))

    def pids(self) -> dict[str, int]:
        """See :meth:`Recorder.pids`."""
        return _decoded(self.client.hgetall(self.pid_key))


def _decoded(mapping: t.Any) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in mapping.items()}


class PostgresRecorder:
    """Effects as rows of the table ``NAMESPACE_fx``: one row per start and
    one per effect, never updated, so a doubled effect shows as two rows.

    :param url: the PostgreSQL to write to (``postgresql://`` or
        ``postgresql+psycopg://``).
    :param namespace: the per-test name.
    """

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.table = f"{namespace}_fx"
        self._connection: t.Any = None

    def _execute(self, sql: str, params: tuple[t.Any, ...] = ()) -> list[tuple[t.Any, ...]]:
        import psycopg

        if self._connection is None or self._connection.closed:
            self._connection = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        with self._connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create(self) -> None:
        """Create the table (the test calls this before starting servers)."""
        self._execute(
            f"CREATE TABLE {self.table} (event_id text NOT NULL, phase text NOT NULL, pid int)"
        )
        # Two starts of one id: the unique index tells the first from the next.
        self._execute(
            f"CREATE UNIQUE INDEX {self.table}_start ON {self.table} (event_id)"
            " WHERE phase = 'start'"
        )

    def drop(self) -> None:
        """Drop the table."""
        self._execute(f"DROP TABLE IF EXISTS {self.table}")

    def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            self._connection.close()

    def start(self, event_id: str, pid: int) -> bool:
        """See :meth:`Recorder.start`."""
        rows = self._execute(
            f"INSERT INTO {self.table} (event_id, phase, pid) VALUES (%s, 'start', %s)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (event_id, pid),
        )
        return bool(rows)

    def effect(self, event_id: str) -> None:
        """See :meth:`Recorder.effect`."""
        self._execute(
            f"INSERT INTO {self.table} (event_id, phase) VALUES (%s, 'effect')", (event_id,)
        )

    def effects(self) -> dict[str, int]:
        """See :meth:`Recorder.effects`."""
        rows = self._execute(
            f"SELECT event_id, count(*) FROM {self.table} WHERE phase = 'effect' GROUP BY event_id"
        )
        return {event_id: int(count) for event_id, count in rows}

    def pids(self) -> dict[str, int]:
        """See :meth:`Recorder.pids`."""
        rows = self._execute(f"SELECT event_id, pid FROM {self.table} WHERE phase = 'start'")
        return {event_id: int(pid) for event_id, pid in rows}


def recorder(url: str, namespace: str) -> RedisRecorder | PostgresRecorder:
    """Return the recorder for ``url``'s kind of service."""
    if url.startswith("redis"):
        return RedisRecorder(url, namespace)
    return PostgresRecorder(url, namespace)


def create_app() -> Flask:
    """Build the app from the ``PLOINTS_FAULTS_*`` environment variables."""
    namespace = os.environ["PLOINTS_FAULTS_NAMESPACE"]
    app = Flask("ploints_faults")
    app.config.update(
        PLOINTS_WEBHOOK_SECRET=SECRET,
        PLOINTS_DEDUPE_STORE=os.environ["PLOINTS_FAULTS_STORE"],
        PLOINTS_REDIS_PREFIX=f"{namespace}:store:",
        PLOINTS_SQL_TABLE=f"{namespace}_store",
        PLOINTS_CLAIM_LEASE=float(os.environ.get("PLOINTS_FAULTS_LEASE", "30")),
    )
    webhooks = PlointsWebhooks(app)
    # Built lazily, in the worker process: a connection made before the fork
    # would be shared by every worker.
    effects: list[RedisRecorder | PostgresRecorder] = []

    @webhooks.on_any
    def record(event: Event) -> None:
        if not effects:
            effects.append(recorder(os.environ["PLOINTS_FAULTS_EFFECTS"], namespace))
        first = effects[0].start(event.id, os.getpid())
        hang = event.data.get("hang")
        if first and hang:
            time.sleep(float(hang))
        effects[0].effect(event.id)

    return app
