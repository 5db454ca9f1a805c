"""A dedupe store in a SQL database, through SQLAlchemy Core.

Needs SQLAlchemy 2: ``pip install 'flask-ploints[sqlalchemy]'``, plus the
database's driver (psycopg 3 for PostgreSQL).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
import typing as t

from .base import Claim
from .base import ClaimStatus
from .base import StoredEvent
from .base import StoreError

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.engine import Connection
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import StaticPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "SQLAlchemyStore needs SQLAlchemy 2; install it with:"
        " pip install 'flask-ploints[sqlalchemy]'"
    ) from exc

__all__ = ["SQLAlchemyStore"]

IN_FLIGHT = "in_flight"
DONE = "done"
FAILED = "failed"

_DONE = Claim(ClaimStatus.DONE)
# A claim retries when the row changes between its statements (released or
# purged by another request); more than a few rounds means something is wrong.
_CLAIM_ROUNDS = 5
_ROWCOUNT = {"preserve_rowcount": True}


def _make_table(name: str) -> sa.Table:
    table = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        # Times are float seconds since the epoch from time.time() on the
        # client: the same in every dialect, at the cost of synchronised
        # clocks across hosts.
        sa.Column("lease_expires", sa.Double(), nullable=False),
        sa.Column("expires", sa.Double(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    sa.Index(f"ix_{name}_status_updated", table.c.status, table.c.updated_at)
    return table


class SQLAlchemyStore:
    """Remembers event ids in one table of a SQL database, so every worker
    process and host shares the same dedupe state. Tested on PostgreSQL
    (psycopg 3) and SQLite; other databases SQLAlchemy supports should work.

    One row per event id: its ``status`` (``in_flight``, ``done``,
    ``failed``), the ``token`` of the current claim, when the lease ends
    (``lease_expires``) and when a done or failed row is forgotten
    (``expires``), how many times it was claimed (``attempts``), the error of
    the last :meth:`fail`, the ``payload`` when ``keep_payloads`` is set, and
    ``created_at`` / ``updated_at``.

    A claim is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` on
    PostgreSQL and SQLite: it inserts a new id, or takes over a row that
    failed, whose lease ran out, or whose retention passed; when it changes
    nothing a ``SELECT`` in the same transaction tells ``DONE`` from
    ``IN_FLIGHT``. Other databases insert, then update on a duplicate key.
    :meth:`commit`, :meth:`release`, :meth:`extend` and :meth:`fail` are one
    conditional ``UPDATE`` or ``DELETE`` each, that only match while the
    token owns a live lease.

    **Clocks.** Times are ``time.time()`` of the host that writes them, stored
    as float seconds since the epoch so that every dialect compares them the
    same way. Hosts sharing a table need synchronised clocks (NTP); a host
    whose clock runs ahead expires leases early.

    **Rows are not deleted by themselves.** Expired rows are taken over by the
    next claim of their id, but rows of ids never seen again stay until
    :meth:`purge` removes them: call it from a periodic job.

    **SQLite** allows one writer at a time: the store serialises its own
    calls with a lock, and :meth:`from_url` sets a busy timeout for other
    processes. An in-memory database (``sqlite://``) lives in one connection,
    shared by all threads, and dies with the process.

    Every :class:`sqlalchemy.exc.SQLAlchemyError` is raised as
    :class:`.StoreError`. It implements :class:`.InspectableStore`.

    :param engine: the engine to use; a Flask-SQLAlchemy ``db.engine`` can
        be shared.
    :param table_name: the table to keep event ids in.
    :param keep_payloads: keep each event's raw body, for replay.
    :param create_table: create the table (if missing) on first use; else
        call :meth:`create_table` or create it with your migrations.

    .. versionadded:: 0.1
    """

    #: Dialects that claim in one ``INSERT ... ON CONFLICT DO UPDATE``, with
    #: their ``insert`` construct; others insert, then update.
    _upserts: t.ClassVar[dict[str, t.Callable[[sa.Table], t.Any]]] = {
        "postgresql": postgresql.insert,
        "sqlite": sqlite.insert,
    }

    def __init__(
        self,
        engine: Engine,
        *,
        table_name: str = "ploints_events",
        keep_payloads: bool = True,
        create_table: bool = True,
    ) -> None:
        self.engine = engine
        self.table = _make_table(table_name)
        self.keep_payloads = keep_payloads
        self._needs_table = create_table
        self._create_lock = threading.Lock()
        self._lock: t.ContextManager[t.Any] = (
            # SQLite has one writer at a time (and one shared connection when
            # in memory): threads queue here rather than on busy timeouts.
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 2.0,
        engine_options: t.Mapping[str, t.Any] | None = None,
        **kwargs: t.Any,
    ) -> SQLAlchemyStore:
        """Build a store with its own engine for ``url``. No connection is
        made until the first call.

        A ``postgresql://`` (or ``postgres://``) URL without a driver uses
        psycopg 3. An in-memory SQLite URL (``sqlite://``) gets a
        :class:`~sqlalchemy.pool.StaticPool`, so that every thread sees the
        same database. Connections are checked before use
        (``pool_pre_ping``).

        :param url: a SQLAlchemy database URL.
        :param timeout: seconds to wait to connect; on SQLite, for another
            process's write lock.
        :param engine_options: more keyword arguments for
            :func:`sqlalchemy.create_engine`; they win over the above.
        :param kwargs: passed to the constructor (``table_name``,
            ``keep_payloads``, ``create_table``).
        """
        parsed = make_url(_with_driver(url))
        options: dict[str, t.Any] = {"pool_pre_ping": True}
        connect_args: dict[str, t.Any] = {}
        backend = parsed.get_backend_name()
        if backend == "postgresql":
            # libpq counts whole seconds and treats anything under 2 as 2.
            connect_args["connect_timeout"] = max(2, math.ceil(timeout))
        elif backend in ("mysql", "mariadb"):
            connect_args["connect_timeout"] = max(1, math.ceil(timeout))
        elif backend == "sqlite":
            connect_args["timeout"] = timeout
            connect_args["check_same_thread"] = False
            if parsed.database in (None, "", ":memory:"):
                options["poolclass"] = StaticPool
        extra = dict(engine_options or {})
        connect_args.update(extra.pop("connect_args", {}))
        options["connect_args"] = connect_args
        options.update(extra)
        return cls(sa.create_engine(parsed, **options), **kwargs)

    def create_table(self) -> None:
        """Create the table and its index unless they exist.

        :raises StoreError: the database refused.
        """
        with self._create_lock:
            self._create_table()

    def _create_table(self) -> None:
        # The caller holds _create_lock.
        try:
            with self._lock:
                try:
                    self.table.create(self.engine, checkfirst=True)
                except SQLAlchemyError:
                    # Another process created it between the check and the
                    # create; the second check sees it.
                    self.table.create(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            raise _store_error(exc) from exc
        self._needs_table = False

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. The payload is kept when
        ``keep_payloads`` is set; a new claim without one keeps the last.
        """
        token = secrets.token_hex(8)
        if not self.keep_payloads:
            payload = None
        c = self.table.c
        for _ in range(_CLAIM_ROUNDS):
            now = time.time()
            with self._begin() as conn:
                if self._take(conn, event_id, token, now, lease, payload):
                    return Claim(ClaimStatus.CLAIMED, token)
                row = conn.execute(
                    sa.select(c.status, c.lease_expires, c.expires).where(c.id == event_id)
                ).first()
            if row is None:
                continue
            if row.status == DONE and row.expires > now:
                return _DONE
            if row.status == IN_FLIGHT and row.lease_expires > now:
                return Claim(ClaimStatus.IN_FLIGHT, retry_after=row.lease_expires - now)
        raise StoreError(f"the claim of {event_id!r} kept racing with other requests")

    def _take(
        self,
        conn: Connection,
        event_id: str,
        token: str,
        now: float,
        lease: float,
        payload: bytes | None,
    ) -> bool:
        """Insert the row, or take it over when it is free; ``True`` when this
        claim owns it.
        """
        c = self.table.c
        values = {
            "id": event_id,
            "status": IN_FLIGHT,
            "token": token,
            "lease_expires": now + lease,
            "expires": now + lease,
            "attempts": 1,
            "error": None,
            "payload": payload,
            "created_at": now,
            "updated_at": now,
        }
        free = sa.or_(
            c.status == FAILED,
            sa.and_(c.status == IN_FLIGHT, c.lease_expires <= now),
            sa.and_(c.status == DONE, c.expires <= now),
        )
        # A done or failed row past its retention is forgotten: the claim
        # starts it afresh rather than counting on from it.
        forgotten = sa.and_(c.status != IN_FLIGHT, c.expires <= now)
        changes: dict[str, t.Any] = {
            "status": IN_FLIGHT,
            "token": token,
            "lease_expires": now + lease,
            "expires": now + lease,
            "attempts": sa.case((forgotten, 1), else_=c.attempts + 1),
            "error": sa.case((forgotten, sa.null()), else_=c.error),
            "payload": (
                payload if payload is not None else sa.case((forgotten, sa.null()), else_=c.payload)
            ),
            "created_at": sa.case((forgotten, now), else_=c.created_at),
            "updated_at": now,
        }
        dialect = conn.dialect
        upsert = self._upserts.get(dialect.name)
        if dialect.name == "sqlite" and (dialect.server_version_info or (0,)) < (3, 24):
            upsert = None
        if upsert is not None:
            statement = (
                upsert(self.table)
                .values(values)
                .on_conflict_do_update(index_elements=[c.id], set_=changes, where=free)
            )
            # SQLAlchemy only reports an INSERT's rowcount when asked to.
            return conn.execute(statement, execution_options=_ROWCOUNT).rowcount == 1
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(self.table).values(values))
            return True
        except IntegrityError:
            pass
        statement = sa.update(self.table).where(c.id == event_id, free).values(changes)
        return conn.execute(statement).rowcount == 1

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`."""
        now = time.time()
        return self._settle(
            event_id,
            token,
            now,
            {"status": DONE, "expires": now + retention, "updated_at": now},
        )

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`. The row is deleted."""
        return self._settle(event_id, token, time.time(), None)

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`."""
        now = time.time()
        return self._settle(
            event_id,
            token,
            now,
            {"lease_expires": now + lease, "expires": now + lease, "updated_at": now},
        )

    def fail(self, event_id: str, token: str, error: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.fail`. The row keeps the error for
        ``retention`` seconds.
        """
        now = time.time()
        return self._settle(
            event_id,
            token,
            now,
            {"status": FAILED, "error": error, "expires": now + retention, "updated_at": now},
        )

    def _settle(
        self, event_id: str, token: str, now: float, changes: dict[str, t.Any] | None
    ) -> bool:
        c = self.table.c
        owns = sa.and_(
            c.id == event_id, c.token == token, c.status == IN_FLIGHT, c.lease_expires > now
        )
        statement: sa.Executable = (
            sa.delete(self.table).where(owns)
            if changes is None
            else sa.update(self.table).where(owns).values(changes)
        )
        with self._begin() as conn:
            return conn.execute(statement).rowcount == 1

    def purge(self, now: float | None = None, *, in_flight_grace: float = 86400.0) -> int:
        """Delete the rows the store no longer needs, and return how many.

        Those are done and failed rows past their retention, and in-flight
        rows whose lease ended more than ``in_flight_grace`` seconds ago (their
        process died; the sender's next retry would claim them anew). Run it
        from a periodic job; the receiver never calls it.

        :param now: the time to purge as of, in seconds since the epoch;
            default, the current time.
        :param in_flight_grace: how long to keep an abandoned in-flight row,
            for inspection.
        """
        now = time.time() if now is None else now
        c = self.table.c
        statement = sa.delete(self.table).where(
            sa.or_(
                sa.and_(c.status.in_([DONE, FAILED]), c.expires <= now),
                sa.and_(c.status == IN_FLIGHT, c.lease_expires <= now - in_flight_grace),
            )
        )
        with self._begin() as conn:
            return conn.execute(statement).rowcount

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`."""
        now = time.time()
        c = self.table.c
        live = sa.or_(
            sa.and_(c.status == IN_FLIGHT, c.lease_expires > now),
            sa.and_(c.status != IN_FLIGHT, c.expires > now),
        )
        with self._begin() as conn:
            row = conn.execute(self._select().where(c.id == event_id, live)).first()
        return None if row is None else _stored(row)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`. Uses the index on
        ``(status, updated_at)``.
        """
        c = self.table.c
        statement = (
            self._select()
            .where(c.status == FAILED, c.expires > time.time())
            .order_by(c.updated_at.desc())
            .limit(max(limit, 0))
        )
        with self._begin() as conn:
            rows = conn.execute(statement).all()
        return [_stored(row) for row in rows]

    def _select(self) -> sa.Select[t.Any]:
        c = self.table.c
        return sa.select(c.id, c.status, c.attempts, c.error, c.payload, c.updated_at)

    @contextlib.contextmanager
    def _begin(self) -> t.Iterator[Connection]:
        if self._needs_table:
            with self._create_lock:
                if self._needs_table:
                    self._create_table()
        try:
            with self._lock, self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise _store_error(exc) from exc


def _with_driver(url: str) -> str:
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _store_error(exc: SQLAlchemyError) -> StoreError:
    # The driver's own message, without SQLAlchemy's echo of the statement and
    # its parameters (which hold payloads).
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return StoreError(f"database: {type(exc.orig).__name__}: {exc.orig}".strip())
    return StoreError(f"database: {type(exc).__name__}: {exc}")


def _stored(row: sa.Row[t.Any]) -> StoredEvent:
    return StoredEvent(
        id=row.id,
        status=row.status,
        attempts=row.attempts,
        error=row.error,
        payload=None if row.payload is None else bytes(row.payload),
        updated_at=row.updated_at,
    )
