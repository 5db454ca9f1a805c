"""The one place that talks to the DBAPI driver: compiled SQL run on a raw
cursor, and the driver's errors mapped to :class:`DriverError`.

SQLAlchemy builds and compiles the store's statements and pools its
connections, but its execution layer costs more per call than the database
does for these one-row statements, so the store runs them here. Engine
events (``before_cursor_execute``, ``echo``) do not see them.
"""

from __future__ import annotations

import contextlib
import typing as t

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import SQLCompiler

from .deadline import deadline

__all__ = ["Cursor", "DriverError", "Query", "checkout", "set_autocommit", "unset_autocommit"]

#: How many pooled connections a checkout after a disconnect pings, each
#: one found dead invalidated (reconnected on its next checkout), before it
#: takes the next one unchecked.
_MAX_DEAD = 32


class DriverError(Exception):
    """A DBAPI error of the store's own call, with what the store needs.

    :param orig: the driver's exception; its message never holds the
        statement's parameters.
    :param dead: the connection is dead (invalidated already): the call may
        run again on another one.
    :param duplicate: a unique or primary key violation.
    :param timed_out: the statement ran past its deadline and its connection
        was cut: the database is not answering, so the call is not run again.
    """

    def __init__(
        self,
        orig: Exception,
        *,
        dead: bool = False,
        duplicate: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(f"{type(orig).__name__}: {orig}")
        self.orig = orig
        self.dead = dead or timed_out
        self.duplicate = duplicate
        self.timed_out = timed_out


def _driver_error(
    exc: Exception, dialect: Dialect, connection: PoolProxiedConnection, cursor: t.Any = None
) -> DriverError:
    """Map ``exc`` and, when it lost the connection, invalidate ``connection``."""
    dead = dialect.is_disconnect(t.cast(t.Any, exc), connection.dbapi_connection, cursor)
    if dead:
        # The pool reconnects this entry on its next checkout.
        connection.invalidate(exc)
    return DriverError(
        exc, dead=dead, duplicate=isinstance(exc, dialect.loaded_dbapi.IntegrityError)
    )


class Query:
    """One statement compiled for a dialect, with what it takes to run it on
    a DBAPI cursor: its SQL, and its parameters converted by their types'
    bind processors and put in order for a positional paramstyle.

    Public API only: the SQL and the order from
    :meth:`SQLCompiler.construct_expanded_state`, computed once (a
    statement whose parameters expand per call, an ``IN`` list, asks for it
    on every call), and the processors of the statement's own parameters
    from their types. ``test_statements_run_as_sqlalchemy_would_run_them``
    pins that it sends what SQLAlchemy's execution sends.
    """

    def __init__(self, statement: sa.ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self._compiled = compiled
        self._names = tuple(compiled.params)
        state = compiled.construct_expanded_state(dict.fromkeys(compiled.params))
        self._per_call = bool(state.parameter_expansion)
        self.sql = state.statement
        self._order = None if state.positiontup is None else tuple(state.positiontup)
        self._processors: list[tuple[str, t.Callable[[t.Any], t.Any]]] = []
        names = set(compiled.params)
        for element in visitors.iterate(statement):
            if isinstance(element, sa.BindParameter) and element.key in names:
                names.discard(element.key)  # each name once
                process = element.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    self._processors.append((element.key, process))

    def bind(self, params: t.Mapping[str, t.Any]) -> tuple[str, t.Any]:
        """The SQL and the DBAPI parameters to execute for ``params``."""
        values: t.MutableMapping[str, t.Any]
        try:
            # What construct_params returns when every parameter is given,
            # at a fraction of its cost on every statement.
            values = {name: params[name] for name in self._names}
        except KeyError:
            # One left to its default: SQLAlchemy fills it in.
            values = self._compiled.construct_params(params)
        for name, process in self._processors:
            values[name] = process(values[name])
        if self._per_call:
            state = self._compiled.construct_expanded_state(values)
            expanded = state.parameters
            return state.statement, (
                expanded if state.positiontup is None else state.positional_parameters
            )
        return self.sql, values if self._order is None else tuple(values[n] for n in self._order)


class Cursor:
    """A DBAPI cursor on one connection of a store's call, running the
    store's compiled statements.

    :param connection: the connection, checked out of the pool.
    :param dialect: its engine's dialect.
    :param queries: the compiled statements by ``id()`` of the statement,
        filled on first use (once the dialect knows the server).
    :param timeout: the most seconds one statement may take; ``None`` for
        no bound. See :mod:`.deadline`.
    """

    def __init__(
        self,
        connection: PoolProxiedConnection,
        dialect: Dialect,
        queries: dict[int, Query],
        timeout: float | None = None,
    ) -> None:
        self._connection = connection
        self._dialect = dialect
        self._queries = queries
        self._timeout = timeout
        try:
            self._cursor = connection.cursor()
        except dialect.loaded_dbapi.Error as exc:
            raise _driver_error(exc, dialect, connection) from exc

    def execute(self, statement: sa.ClauseElement, params: t.Mapping[str, t.Any]) -> DBAPICursor:
        """Run ``statement``; the cursor, to read its rows or rowcount.

        :raises DriverError: the driver refused.
        """
        query = self._queries.get(id(statement))
        if query is None:
            query = self._queries[id(statement)] = Query(statement, self._dialect)
        sql, values = query.bind(params)
        # Released by hand rather than by a with block: two Python calls
        # fewer on every statement.
        guard = deadline(self._connection.dbapi_connection, self._timeout)
        try:
            try:
                self._cursor.execute(sql, values)
            finally:
                guard.release()
        except self._dialect.loaded_dbapi.Error as exc:
            if guard.fired:
                self._connection.invalidate(exc)
                raise DriverError(exc, timed_out=True) from exc
            raise _driver_error(exc, self._dialect, self._connection, self._cursor) from exc
        return self._cursor

    def first(self, statement: sa.ClauseElement, params: t.Mapping[str, t.Any]) -> t.Any:
        """The first row of ``statement``, or ``None``."""
        rows = self.execute(statement, params).fetchall()
        return rows[0] if rows else None

    def close(self) -> None:
        # Not contextlib.suppress: it is three more Python calls per call.
        try:  # noqa: SIM105
            self._cursor.close()
        except Exception:
            pass


def _dbapi(connection: PoolProxiedConnection) -> t.Any:
    dbapi_connection = connection.dbapi_connection
    assert dbapi_connection is not None  # a checked-out connection has one
    return dbapi_connection


def checkout(
    engine: Engine, *, check: bool = False, timeout: float | None = None
) -> PoolProxiedConnection:
    """A connection out of ``engine``'s pool.

    :param check: ping it first, and replace one found dead: after a
        disconnect, the pool's other connections are likely dead too.
    :param timeout: the most seconds a ping may take.
    :raises DriverError: connecting failed.
    """
    dialect = engine.dialect
    for _ in range(_MAX_DEAD if check else 1):
        try:
            connection = engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:
            raise DriverError(exc) from exc
        if not check:
            return connection
        try:
            with deadline(_dbapi(connection), timeout):
                alive = dialect.do_ping(_dbapi(connection))
            if alive:
                return connection
            connection.invalidate()
        except dialect.loaded_dbapi.Error as exc:
            connection.invalidate(exc)
        connection.close()
    return checkout(engine)


def set_autocommit(connection: PoolProxiedConnection, dialect: Dialect) -> None:
    """Switch ``connection`` to autocommit mode.

    :raises DriverError: the driver refused.
    """
    try:
        dialect.set_isolation_level(_dbapi(connection), "AUTOCOMMIT")
    except dialect.loaded_dbapi.Error as exc:
        raise _driver_error(exc, dialect, connection) from exc


def unset_autocommit(connection: PoolProxiedConnection, dialect: Dialect) -> None:
    """Switch ``connection`` back to the engine's isolation level, quietly."""
    if connection.is_valid:
        with contextlib.suppress(Exception):
            dialect.reset_isolation_level(_dbapi(connection))
