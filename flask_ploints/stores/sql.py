"""A dedupe store in a SQL database, through SQLAlchemy Core.

Needs SQLAlchemy 2: ``pip install 'flask-ploints[sqlalchemy]'``, plus the
database's driver (psycopg 3 for PostgreSQL).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import threading
import time
import typing as t
import weakref

from .base import Claim
from .base import ClaimStatus
from .base import EventState
from .base import StoredEvent
from .base import StoreError

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.engine import Dialect
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.engine.interfaces import DBAPICursor
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import PoolProxiedConnection
    from sqlalchemy.pool import StaticPool
    from sqlalchemy.sql.compiler import SQLCompiler
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "SQLAlchemyStore needs SQLAlchemy 2; install it with:"
        " pip install 'flask-ploints[sqlalchemy]'"
    ) from exc

__all__ = ["SQLAlchemyStore", "engine_from_url", "ensure_table"]

IN_FLIGHT = EventState.IN_FLIGHT
DONE = EventState.DONE
FAILED = EventState.FAILED

_DONE = Claim(ClaimStatus.DONE)
# A claim goes round again when the row changes under it (released, purged,
# or inserted by a concurrent claim after the statement's snapshot); more
# than a few rounds means something is wrong.
_CLAIM_ROUNDS = 5
_T = t.TypeVar("_T")


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


# The parameters of the statements the store builds once. Their names differ
# from the column names, which SQLAlchemy keeps for the VALUES and SET clauses
# of INSERT and UPDATE.
_event_id = sa.bindparam("event_id", type_=sa.String())
_token = sa.bindparam("claim_token", type_=sa.String())
_now: sa.BindParameter[float] = sa.bindparam("now", type_=sa.Double())
_lease_end: sa.BindParameter[float] = sa.bindparam("lease_end", type_=sa.Double())
_keep_until: sa.BindParameter[float] = sa.bindparam("keep_until", type_=sa.Double())
_payload = sa.bindparam("body", type_=sa.LargeBinary())
_error = sa.bindparam("reason", type_=sa.Text())
# The constants, written into the SQL rather than sent as parameters: fewer
# parameters for the driver to adapt on every call.
_SQL_IN_FLIGHT = sa.literal_column(f"'{IN_FLIGHT}'", sa.String())
_SQL_DONE = sa.literal_column(f"'{DONE}'", sa.String())
_SQL_FAILED = sa.literal_column(f"'{FAILED}'", sa.String())
_SQL_ONE = sa.literal_column("1", sa.Integer())


def _take_over(
    c: t.Any, token: t.Any, lease_end: t.Any, payload: t.Any, now: t.Any
) -> tuple[sa.ColumnElement[bool], dict[str, t.Any]]:
    """When a claim may take over an existing row, and what it sets then,
    given the claim's values as SQL expressions.
    """
    # A row a claim may take over: failed, its lease ran out, or done and
    # past its retention.
    free = sa.or_(
        c.status == _SQL_FAILED,
        sa.and_(c.status == _SQL_IN_FLIGHT, c.lease_expires <= now),
        sa.and_(c.status == _SQL_DONE, c.expires <= now),
    )
    # A done or failed row past its retention is forgotten: the claim starts
    # it afresh rather than counting on from it.
    forgotten = sa.and_(c.status != _SQL_IN_FLIGHT, c.expires <= now)
    old_payload = sa.case((forgotten, sa.null()), else_=c.payload)
    return free, {
        "status": _SQL_IN_FLIGHT,
        "token": token,
        "lease_expires": lease_end,
        "expires": lease_end,
        "attempts": sa.case((forgotten, _SQL_ONE), else_=c.attempts + _SQL_ONE),
        "error": sa.case((forgotten, sa.null()), else_=c.error),
        # A claim without a payload keeps the last one.
        "payload": sa.func.coalesce(payload, old_payload, type_=sa.LargeBinary()),
        "created_at": sa.case((forgotten, now), else_=c.created_at),
        "updated_at": now,
    }


class _Statements:
    """Every statement of one store's table, built once with bind parameters
    (and compiled once, by :class:`_Query`), so that a call only executes.
    """

    def __init__(
        self, table: sa.Table, upsert: t.Callable[[sa.Table], t.Any] | None, dialect: str
    ) -> None:
        c = table.c
        # What a claim reads back: ours when the token is, else who holds it.
        holder = (c.token, c.status, c.lease_expires, c.expires)
        self.holder: sa.Select[t.Any] = sa.select(*holder).where(c.id == _event_id)
        values = {
            "id": _event_id,
            "status": _SQL_IN_FLIGHT,
            "token": _token,
            "lease_expires": _lease_end,
            "expires": _lease_end,
            "attempts": _SQL_ONE,
            "error": sa.null(),
            "payload": _payload,
            "created_at": _now,
            "updated_at": _now,
        }
        #: ``INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE free RETURNING``
        #: the holder: our row when the claim inserted or took over the id, no
        #: row when it changed nothing. ``None`` without ON CONFLICT.
        self.upsert: sa.ClauseElement | None = None
        #: On PostgreSQL, the whole claim in one statement: the upsert as a
        #: CTE, then the current holder when the upsert returned nothing::
        #:
        #:     WITH claimed AS (INSERT ... RETURNING token, status, ...)
        #:     SELECT token, status, ... FROM claimed
        #:     UNION ALL
        #:     SELECT token, status, ... FROM <table>
        #:     WHERE id = :event_id AND NOT EXISTS (SELECT * FROM claimed)
        #:
        #: The second SELECT reads the statement's snapshot, so a row that a
        #: concurrent claim inserted since may be missing: no row at all,
        #: and the claim goes round again.
        self.claim: sa.ClauseElement | None = None
        #: ``INSERT ... ON CONFLICT DO NOTHING``: the claim of an id never
        #: seen, the common case, as cheap as it gets. Only when it inserts
        #: nothing does :attr:`claim` or :attr:`upsert` follow. ``None``
        #: without ON CONFLICT.
        self.insert_new: sa.ClauseElement | None = None
        if upsert is not None:
            inserting: t.Any = upsert(table).values(values)
            self.insert_new = inserting.on_conflict_do_nothing(index_elements=[c.id])
            # The conflict clause reads the claim's values from the row it
            # proposed (EXCLUDED) rather than from parameters again: each
            # mention of a parameter is one more for the driver to send.
            proposed = inserting.excluded
            free, take_over = _take_over(
                c, proposed.token, proposed.lease_expires, proposed.payload, proposed.updated_at
            )
            upserting: t.Any = inserting.on_conflict_do_update(
                index_elements=[c.id], set_=take_over, where=free
            ).returning(*holder)
            self.upsert = upserting
            if dialect == "postgresql":
                claimed = upserting.cte("claimed")
                self.claim = sa.union_all(
                    sa.select(*(claimed.c[column.name] for column in holder)),
                    self.holder.where(~sa.exists().select_from(claimed)),
                )
        #: Without ON CONFLICT: insert, and on a duplicate key take over.
        self.insert = sa.insert(table).values(values)
        free, take_over = _take_over(c, _token, _lease_end, _payload, _now)
        self.take_over = sa.update(table).where(c.id == _event_id, free).values(take_over)

        owns = sa.and_(
            c.id == _event_id, c.token == _token, c.status == _SQL_IN_FLIGHT, c.lease_expires > _now
        )
        self.commit = (
            sa.update(table)
            .where(owns)
            .values(status=_SQL_DONE, expires=_keep_until, updated_at=_now)
        )
        self.release = sa.delete(table).where(owns)
        self.extend = (
            sa.update(table)
            .where(owns)
            .values(lease_expires=_lease_end, expires=_lease_end, updated_at=_now)
        )
        self.fail = (
            sa.update(table)
            .where(owns)
            .values(status=_SQL_FAILED, error=_error, expires=_keep_until, updated_at=_now)
        )

        self.purge = sa.delete(table).where(
            sa.or_(
                sa.and_(c.status.in_([_SQL_DONE, _SQL_FAILED]), c.expires <= _now),
                sa.and_(
                    c.status == _SQL_IN_FLIGHT,
                    c.lease_expires <= sa.bindparam("abandoned_before", type_=sa.Double()),
                ),
            )
        )
        event = sa.select(c.id, c.status, c.attempts, c.error, c.payload, c.updated_at)
        live = sa.or_(
            sa.and_(c.status == _SQL_IN_FLIGHT, c.lease_expires > _now),
            sa.and_(c.status != _SQL_IN_FLIGHT, c.expires > _now),
        )
        self.get: sa.Select[t.Any] = event.where(c.id == _event_id, live)
        self.failed: sa.Select[t.Any] = (
            event.where(c.status == _SQL_FAILED, c.expires > _now)
            .order_by(c.updated_at.desc())
            .limit(sa.bindparam("limit", type_=sa.Integer()))
        )


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

    Statements run in autocommit mode, without ``BEGIN`` or ``COMMIT``, one
    round trip each:

    * A claim of a new id is one ``INSERT ... ON CONFLICT DO NOTHING``. When
      the id exists, a second statement, ``INSERT ... ON CONFLICT DO UPDATE
      ... WHERE ... RETURNING``, takes over a row that failed, whose lease
      ran out, or whose retention passed. On PostgreSQL that statement also
      returns the row's holder when it changed nothing, to tell ``DONE``
      from ``IN_FLIGHT``; on SQLite a ``SELECT`` follows then. Other
      databases insert, update on a duplicate key, then select.
    * :meth:`commit`, :meth:`release`, :meth:`extend` and :meth:`fail` are one
      conditional ``UPDATE`` or ``DELETE`` each, that only match while the
      token owns a live lease.

    SQLAlchemy builds and compiles the statements, once per store, and pools
    the connections; the store runs the compiled SQL on the DBAPI cursor
    itself, because SQLAlchemy's execution layer costs more per call than the
    database does for these one-row statements. So engine events
    (``before_cursor_execute``, ``echo``) do not see the store's statements.

    **Connections** are not checked before use (no ``pool_pre_ping``, which
    costs a round trip per call): a call whose pooled connection turns out
    dead (the database restarted, a proxy dropped it) drops the pool's
    connections as old as it, as SQLAlchemy does, and runs once more on a new
    connection. A claim that reached the database before its connection died
    recognises its own token on the second run; a :meth:`commit`,
    :meth:`fail` or :meth:`release` checks whether the first run did the
    work. A failure to connect is not retried. An engine with
    ``pool_pre_ping`` works too, a round trip slower. A store made by
    :meth:`from_url` keeps the connections it used between calls (see
    there); call :meth:`close` to give them back.

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
        be shared. The store switches a connection to autocommit mode for
        the time of a call, and back.
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
        # Where each call gets its connection: a shared engine's pool, for
        # the time of the call, switched to autocommit and back; see
        # from_url for an engine of the store's own.
        self._connections: _Connections = _PerCall(engine, switch=True)
        self._queries: dict[int, _Query] = {}
        self.table = _make_table(table_name)
        self.keep_payloads = keep_payloads
        dialect = engine.dialect.name
        self._sql = _Statements(self.table, self._upserts.get(dialect), dialect)
        self._needs_table = create_table
        self._create_lock = threading.Lock()
        self._lock: t.ContextManager[t.Any] = (
            # SQLite has one writer at a time (and one shared connection when
            # in memory): threads queue here rather than on busy timeouts.
            threading.Lock() if dialect == "sqlite" else contextlib.nullcontext()
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
        """Build a store with its own engine for ``url`` (see
        :func:`engine_from_url`), except that its connections are in
        ``AUTOCOMMIT`` mode (``store.engine.begin()`` does not open a
        transaction) and not pinged before use: the store retries a call on a
        dead connection instead. No connection is made until the first call.

        Except on SQLite, the store keeps the connections it used checked
        out of its engine's pool between calls, at most one per thread
        calling it at the same time (a sync gunicorn worker keeps one), and
        gives them back in :meth:`close`: a checkout and checkin per call
        cost about as much as the statement. A call on a kept connection
        that turns out dead drops all the kept ones.

        :param url: a SQLAlchemy database URL.
        :param timeout: seconds to wait to connect; on SQLite, for another
            process's write lock.
        :param engine_options: more keyword arguments for
            :func:`sqlalchemy.create_engine`; they win over the above.
        :param kwargs: passed to the constructor (``table_name``,
            ``keep_payloads``, ``create_table``).
        """
        options: dict[str, t.Any] = {
            "pool_pre_ping": False,
            "isolation_level": "AUTOCOMMIT",
            **(engine_options or {}),
        }
        autocommit = options["isolation_level"] == "AUTOCOMMIT"
        if autocommit:
            # No transaction is ever left open to roll back on checkin.
            options.setdefault("pool_reset_on_return", None)
        store = cls(engine_from_url(url, timeout=timeout, engine_options=options), **kwargs)
        if autocommit and store.engine.dialect.name != "sqlite":
            # The engine is the store's own: it keeps the connections it used
            # rather than checking each in and out of the pool per call.
            store._connections = _Held(store.engine)
        elif autocommit:
            # Every connection is in autocommit mode from the start: nothing
            # to switch on each checkout.
            store._connections = _PerCall(store.engine, switch=False)
        return store

    def close(self) -> None:
        """Give back the connections the store keeps between calls. The
        store connects again if it is used after.
        """
        self._connections.drop()

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
                ensure_table(self.engine, self.table)
        except SQLAlchemyError as exc:
            raise _store_error(exc) from exc
        self._needs_table = False

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. The payload is kept when
        ``keep_payloads`` is set; a new claim without one keeps the last.
        """
        token = secrets.token_hex(8)
        params: dict[str, t.Any] = {
            "event_id": event_id,
            "claim_token": token,
            "body": payload if self.keep_payloads else None,
        }
        for _ in range(_CLAIM_ROUNDS):
            now = params["now"] = time.time()
            params["lease_end"] = now + lease
            holder = self._run(lambda cursor, _retry: self._claim(cursor, params))
            if holder is None:
                # Released or purged between the statements: go round again.
                continue
            # Our token: the claim inserted or took over the row, now or in
            # a first run whose connection died before the answer came back.
            if holder.token == token and holder.status == IN_FLIGHT:
                return Claim(ClaimStatus.CLAIMED, token)
            if holder.status == DONE and holder.expires > now:
                return _DONE
            if holder.status == IN_FLIGHT and holder.lease_expires > now:
                return Claim(ClaimStatus.IN_FLIGHT, retry_after=holder.lease_expires - now)
        raise StoreError(f"the claim of {event_id!r} kept racing with other requests")

    def _claim(self, cursor: _Cursor, params: dict[str, t.Any]) -> _Holder | None:
        """Insert the row, or take it over when it is free; return the row's
        holder: ours when this claim owns it.
        """
        sql = self._sql
        if sql.insert_new is not None and cursor.execute(sql.insert_new, params).rowcount == 1:
            return _Holder(params["claim_token"], IN_FLIGHT, params["lease_end"], 0.0)
        if sql.claim is not None:
            return _holder(cursor.first(sql.claim, params))
        if sql.upsert is not None and self.engine.dialect.insert_returning:
            holder = _holder(cursor.first(sql.upsert, params))
            if holder is not None:
                return holder
        else:
            # No transaction to roll back: in autocommit mode the failed
            # INSERT leaves the connection usable.
            try:
                cursor.execute(sql.insert, params)
                taken = True
            except IntegrityError:
                taken = cursor.execute(sql.take_over, params).rowcount == 1
            if taken:
                return _Holder(params["claim_token"], IN_FLIGHT, params["lease_end"], 0.0)
        return _holder(cursor.first(sql.holder, params))

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`."""
        now = time.time()
        return self._settle(
            self._sql.commit,
            {"event_id": event_id, "claim_token": token, "now": now, "keep_until": now + retention},
            lambda holder: holder is not None and (holder.token, holder.status) == (token, DONE),
        )

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`. The row is deleted."""
        return self._settle(
            self._sql.release,
            {"event_id": event_id, "claim_token": token, "now": time.time()},
            lambda holder: holder is None,
        )

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`."""
        now = time.time()
        # Run again after a first run that did extend, it matches again.
        return self._settle(
            self._sql.extend,
            {"event_id": event_id, "claim_token": token, "now": now, "lease_end": now + lease},
            None,
        )

    def fail(self, event_id: str, token: str, error: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.fail`. The row keeps the error for
        ``retention`` seconds.
        """
        now = time.time()
        params = {
            "event_id": event_id,
            "claim_token": token,
            "now": now,
            "keep_until": now + retention,
            "reason": error,
        }
        return self._settle(
            self._sql.fail,
            params,
            lambda holder: holder is not None and (holder.token, holder.status) == (token, FAILED),
        )

    def _settle(
        self,
        statement: sa.ClauseElement,
        params: dict[str, t.Any],
        done_before: t.Callable[[_Holder | None], bool] | None,
    ) -> bool:
        """Run a conditional ``UPDATE`` or ``DELETE``: ``True`` when it matched.

        :param done_before: when the statement runs a second time (its first
            connection died) and matches nothing, whether the row shows that
            the first run did the work before the connection died.
        """

        def settle(cursor: _Cursor, retry: bool) -> bool:
            if cursor.execute(statement, params).rowcount == 1:
                return True
            if not retry or done_before is None:
                return False
            return done_before(_holder(cursor.first(self._sql.holder, params)))

        return self._run(settle)

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
        params = {"now": now, "abandoned_before": now - in_flight_grace}
        count: int = self._run(
            lambda cursor, _retry: cursor.execute(self._sql.purge, params).rowcount
        )
        return count

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`."""
        params = {"event_id": event_id, "now": time.time()}
        row = self._run(lambda cursor, _retry: cursor.first(self._sql.get, params))
        return None if row is None else _stored(row)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`. Uses the index on
        ``(status, updated_at)``.
        """
        params = {"now": time.time(), "limit": max(limit, 0)}
        rows = self._run(lambda cursor, _retry: cursor.execute(self._sql.failed, params).fetchall())
        return [_stored(row) for row in rows]

    def _run(self, operation: t.Callable[[_Cursor, bool], _T]) -> _T:
        """Call ``operation(cursor, retry)`` with a cursor on a pooled
        connection in autocommit mode.

        When the connection turns out dead, the pool's connections as old as
        it are dropped (as SQLAlchemy does), and the operation runs once more,
        with ``retry`` set, on a new connection. A failure to connect is not
        retried, so an unreachable database fails within one connect timeout.
        """
        if self._needs_table:
            with self._create_lock:
                if self._needs_table:
                    self._create_table()
        try:
            with self._lock:
                try:
                    return self._attempt(operation, False)
                except DBAPIError as exc:
                    if not exc.connection_invalidated:
                        raise
                return self._attempt(operation, True)
        except SQLAlchemyError as exc:
            raise _store_error(exc) from exc

    def _attempt(self, operation: t.Callable[[_Cursor, bool], _T], retry: bool) -> _T:
        connections = self._connections
        dialect = self.engine.dialect
        try:
            connection = connections.take()
        except dialect.loaded_dbapi.Error as exc:
            # From connecting or switching to autocommit; the statements'
            # own errors come out of _Cursor.execute as SQLAlchemy's.
            raise _wrap(exc, dialect, invalidated=False) from exc
        try:
            cursor = _Cursor(self, connection)
            try:
                return operation(cursor, retry)
            finally:
                cursor.close()
        except DBAPIError as exc:
            if exc.connection_invalidated:
                # The others are as old, and likely as dead.
                connections.drop()
            raise
        finally:
            connections.give_back(connection)


class _Connections(t.Protocol):
    """Where a store's calls get their connections, in autocommit mode."""

    def take(self) -> PoolProxiedConnection:
        """A connection for one call."""

    def give_back(self, connection: PoolProxiedConnection) -> None:
        """The call is over with ``connection``."""

    def drop(self) -> None:
        """Let go of every connection kept for later calls."""


class _PerCall:
    """A connection checked out of the engine's pool for each call.

    :param switch: switch it to autocommit mode for the call, and back
        (an engine the application shares); else the engine's connections
        are in autocommit mode already.
    """

    def __init__(self, engine: Engine, *, switch: bool) -> None:
        self._engine = engine
        self._switch = switch

    def take(self) -> PoolProxiedConnection:
        connection = self._engine.raw_connection()
        if self._switch:
            try:
                self._engine.dialect.set_isolation_level(_dbapi(connection), "AUTOCOMMIT")
            except BaseException:
                connection.close()
                raise
        return connection

    def give_back(self, connection: PoolProxiedConnection) -> None:
        if self._switch and connection.is_valid:
            with contextlib.suppress(Exception):
                self._engine.dialect.reset_isolation_level(_dbapi(connection))
        connection.close()

    def drop(self) -> None:
        # Nothing is kept; the pool replaces connections as old as a dead one.
        pass


def _dbapi(connection: PoolProxiedConnection) -> t.Any:
    dbapi_connection = connection.dbapi_connection
    assert dbapi_connection is not None  # a checked-out connection has one
    return dbapi_connection


#: Connections that a forked process inherited from its parent: kept
#: referenced and unused, so that neither it nor its garbage collector closes
#: them under the parent.
_INHERITED: list[PoolProxiedConnection] = []
_ALL_HELD: weakref.WeakSet[_Held] = weakref.WeakSet()


class _Held:
    """The connections a store keeps checked out of its engine's pool between
    calls, the last one used first.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._idle: list[PoolProxiedConnection] = []
        # A collected store closes its connections rather than leave them to
        # the collector: its engine, and the pool they would go back to, may
        # be on their way out too.
        weakref.finalize(self, _close_all, self._idle, True)
        _ALL_HELD.add(self)

    def take(self) -> PoolProxiedConnection:
        """A kept connection, or a new one from the pool."""
        try:
            return self._idle.pop()
        except IndexError:
            return self._engine.raw_connection()

    def give_back(self, connection: PoolProxiedConnection) -> None:
        """Keep ``connection`` for the next call, or let it go when dead."""
        if connection.is_valid:
            self._idle.append(connection)
        else:
            connection.close()

    def drop(self) -> None:
        """Give every kept connection back to the pool."""
        _close_all(self._idle)

    def forget(self) -> None:
        """In a forked child: the kept connections are the parent's."""
        _INHERITED.extend(self._idle)
        self._idle.clear()


def _close_all(connections: list[PoolProxiedConnection], hard: bool = False) -> None:
    while connections:
        connection = connections.pop()
        with contextlib.suppress(Exception):
            if hard:
                # Closes the DBAPI connection, not only the checkout.
                connection.invalidate()
            connection.close()


def _forget_held() -> None:
    for held in list(_ALL_HELD):
        held.forget()


os.register_at_fork(after_in_child=_forget_held)


class _Query:
    """One statement compiled for the engine's dialect, with what it takes to
    run it on a DBAPI cursor: its SQL, and its parameters converted by their
    types' bind processors and put in order for a positional paramstyle.
    """

    def __init__(self, statement: sa.ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self._compiled = compiled
        self.sql = compiled.string
        # The parameters in order, for drivers that take them by position.
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._processors = [
            (name, process)
            for name, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]

    def parameters(self, params: t.Mapping[str, t.Any]) -> t.Any:
        """The DBAPI parameters for ``params``."""
        values = self._compiled.construct_params(params)
        for name, process in self._processors:
            values[name] = process(values[name])
        return values if self._order is None else tuple(values[name] for name in self._order)


class _Cursor:
    """A DBAPI cursor of a store's call, that runs the store's statements and
    raises DBAPI errors as SQLAlchemy's.
    """

    def __init__(self, store: SQLAlchemyStore, connection: PoolProxiedConnection) -> None:
        self._store = store
        self._connection = connection
        self._cursor = connection.cursor()

    def execute(self, statement: sa.ClauseElement, params: t.Mapping[str, t.Any]) -> DBAPICursor:
        queries = self._store._queries
        dialect = self._store.engine.dialect
        query = queries.get(id(statement))
        if query is None:
            # Compiled on first use, once the dialect knows the server.
            query = queries[id(statement)] = _Query(statement, dialect)
        try:
            self._cursor.execute(query.sql, query.parameters(params))
        except dialect.loaded_dbapi.Error as exc:
            dead = dialect.is_disconnect(exc, self._connection.dbapi_connection, self._cursor)
            if dead:
                # What SQLAlchemy's execution does on a disconnect: this
                # connection goes, and the pool's others as old are replaced
                # on their next checkout (they are likely dead too), so the
                # retry gets a new connection.
                self._store.engine.pool._invalidate(self._connection, exc)
            raise _wrap(exc, dialect, invalidated=dead) from exc
        return self._cursor

    def first(self, statement: sa.ClauseElement, params: t.Mapping[str, t.Any]) -> t.Any:
        """The first row of ``statement``, or ``None``."""
        rows = self.execute(statement, params).fetchall()
        return rows[0] if rows else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cursor.close()


def _wrap(exc: Exception, dialect: Dialect, *, invalidated: bool) -> DBAPIError:
    """The SQLAlchemy exception for a DBAPI error, without the statement."""
    error = DBAPIError.instance(
        None,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=invalidated,
        dialect=dialect,
    )
    assert isinstance(error, DBAPIError)
    return error


class _Holder(t.NamedTuple):
    """Who holds an id: its row's token, status and times."""

    token: str
    status: str
    lease_expires: float
    expires: float


def _holder(row: t.Any) -> _Holder | None:
    return None if row is None else _Holder(*row)


def engine_from_url(
    url: str, *, timeout: float = 2.0, engine_options: t.Mapping[str, t.Any] | None = None
) -> Engine:
    """Build an engine for ``url`` the way :meth:`SQLAlchemyStore.from_url`
    does, for other tables of flask-ploints (the delivery log) to share. No
    connection is made until the first use.

    A ``postgresql://`` (or ``postgres://``) URL without a driver uses
    psycopg 3. An in-memory SQLite URL (``sqlite://``) gets a
    :class:`~sqlalchemy.pool.StaticPool`, so that every thread sees the
    same database. Connections are checked before use (``pool_pre_ping``).

    :param url: a SQLAlchemy database URL.
    :param timeout: seconds to wait to connect; on SQLite, for another
        process's write lock.
    :param engine_options: more keyword arguments for
        :func:`sqlalchemy.create_engine`; they win over the above.

    .. versionadded:: 0.1
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
    return sa.create_engine(parsed, **options)


def ensure_table(engine: Engine, table: sa.Table) -> None:
    """Create ``table`` and its indexes in ``engine``'s database unless they
    exist, also when another process creates them at the same time.

    :raises sqlalchemy.exc.SQLAlchemyError: the database refused.
    """
    try:
        table.create(engine, checkfirst=True)
    except SQLAlchemyError:
        # Another process created it between the check and the create; the
        # second check sees it.
        table.create(engine, checkfirst=True)


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


def _stored(row: t.Sequence[t.Any]) -> StoredEvent:
    # The columns of _Statements.get and .failed, in order.
    id, status, attempts, error, payload, updated_at = row
    return StoredEvent(
        id=id,
        status=EventState(status),
        attempts=attempts,
        error=error,
        payload=None if payload is None else bytes(payload),
        updated_at=updated_at,
    )
