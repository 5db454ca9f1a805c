"""The SQL plumbing that the store and the delivery log share: engines from
URLs, tables created on first use, SQLite's one writer, and database errors
raised as the caller's own exception.
"""

from __future__ import annotations

import math
import re
import threading
import typing as t

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.engine import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ..._errors import PlointsError

__all__ = [
    "Key",
    "ManagedTable",
    "binary_collation",
    "check_collation",
    "database_error",
    "engine_from_url",
    "ensure_table",
]


def engine_from_url(
    url: str, *, timeout: float = 2.0, engine_options: t.Mapping[str, t.Any] | None = None
) -> Engine:
    """Build an engine for ``url`` the way :meth:`SQLAlchemyStore.from_url`
    does, for other tables of flask-ploints (the delivery log) to share. No
    connection is made until the first use.

    A ``postgresql://`` (or ``postgres://``) URL without a driver uses
    psycopg 3. An in-memory SQLite URL (``sqlite://``) gets a
    :class:`~sqlalchemy.pool.StaticPool`, so that every thread sees the
    same database. Connections are checked before use (``pool_pre_ping``),
    and statements' parameters are left out of errors and logs
    (``hide_parameters``).

    :param url: a SQLAlchemy database URL.
    :param timeout: seconds to wait to connect, and for a connection of a
        full pool; on SQLite, for another process's write lock. With PyMySQL
        and mysqlclient, one second more (rounded up) is the driver's read
        and write timeout, behind the statement deadline.
    :param engine_options: more keyword arguments for
        :func:`sqlalchemy.create_engine`; they win over the above.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
        ``timeout`` bounds the wait for a pooled connection too, and sets
        the read and write timeouts of MySQL drivers.
    """
    parsed = make_url(_with_driver(url))
    # The store's parameters hold payloads: kept out of SQLAlchemy's errors
    # and logs.
    options: dict[str, t.Any] = {"pool_pre_ping": True, "hide_parameters": True}
    connect_args: dict[str, t.Any] = {}
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # libpq counts whole seconds and treats anything under 2 as 2.
        connect_args["connect_timeout"] = max(2, math.ceil(timeout))
    elif backend in ("mysql", "mariadb"):
        connect_args["connect_timeout"] = max(1, math.ceil(timeout))
        if parsed.get_driver_name() in ("pymysql", "mysqldb"):
            # Behind the store's statement deadline, a second bound of the
            # driver's own, should the deadline not find the socket.
            connect_args["read_timeout"] = connect_args["write_timeout"] = math.ceil(timeout) + 1
    elif backend == "sqlite":
        connect_args["timeout"] = timeout
        connect_args["check_same_thread"] = False
        if parsed.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool
    extra = dict(engine_options or {})
    connect_args.update(extra.pop("connect_args", {}))
    options["connect_args"] = connect_args
    options.update(extra)
    if "poolclass" not in options:
        # The wait for a connection of a full pool; a pool class of its own
        # (SQLite's StaticPool above) may take no such argument.
        options.setdefault("pool_timeout", timeout)
    return sa.create_engine(parsed, **options)


def _with_driver(url: str) -> str:
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


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


def binary_collation(dialect: Dialect) -> str:
    """The utf8mb4 collation that compares byte for byte on a MySQL or
    MariaDB server, trailing spaces included: ``utf8mb4_bin`` pads them.
    """
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"
    version = dialect.server_version_info or (0,)
    # MySQL 5.7 has no binary collation without padding.
    return "utf8mb4_0900_bin" if version >= (8,) else "utf8mb4_bin"


class Key(sa.types.TypeDecorator[str]):
    """A string column that is compared byte for byte on every database: an
    id, a name, an account. MySQL's and MariaDB's default collations ignore
    case, accents and trailing spaces, so there it is utf8mb4 with
    :func:`binary_collation`; elsewhere the database's default collation is
    binary already (checked by :func:`check_collation`).
    """

    impl = sa.String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[t.Any]:
        if dialect.name in ("mysql", "mariadb"):
            length = t.cast(sa.String, self.impl_instance).length
            return dialect.type_descriptor(
                mysql.VARCHAR(length, charset="utf8mb4", collation=binary_collation(dialect))
            )
        return dialect.type_descriptor(self.impl_instance)


#: SQLite's collations that fold what a key must keep.
_SQLITE_FOLDING = re.compile(r"\bCOLLATE\s+[\"'`\[]?(NOCASE|RTRIM)\b", re.IGNORECASE)


def check_collation(engine: Engine, table: sa.Table, error: type[PlointsError]) -> None:
    """Raise ``error`` when a :class:`Key` column of ``table`` in the
    database compares by a collation that folds case, accents or trailing
    spaces (a table made by an earlier build, or by hand), with the
    statement that fixes it.

    :raises sqlalchemy.exc.SQLAlchemyError: the database refused.
    """
    keys = [column for column in table.columns if isinstance(column.type, Key)]
    if not keys:
        return
    dialect = engine.dialect
    preparer = dialect.identifier_preparer
    wrong: list[tuple[sa.Column[t.Any], str]] = []
    found: dict[str, t.Any]
    with engine.connect() as connection:
        if dialect.name in ("mysql", "mariadb"):
            found = dict(
                connection.execute(
                    sa.text(
                        "SELECT column_name, collation_name FROM information_schema.columns"
                        " WHERE table_schema = DATABASE() AND table_name = :table"
                    ),
                    {"table": table.name},
                ).all()
            )
            expected = binary_collation(dialect)
            wrong = [
                (column, str(found[column.name]))
                for column in keys
                if column.name in found and found[column.name] != expected
            ]
        elif dialect.name == "postgresql":
            found = dict(
                connection.execute(
                    sa.text(
                        "SELECT a.attname, c.collname FROM pg_attribute a"
                        " JOIN pg_collation c ON c.oid = a.attcollation"
                        " WHERE a.attrelid = to_regclass(:table) AND NOT c.collisdeterministic"
                    ),
                    {"table": preparer.format_table(table)},
                ).all()
            )
            wrong = [(column, found[column.name]) for column in keys if column.name in found]
        elif dialect.name == "sqlite":
            sql = connection.execute(
                sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :table"),
                {"table": table.name},
            ).scalar()
            for column in keys:
                pattern = rf"(?:^|[\s(,])[\"'`\[]?{re.escape(column.name)}[\"'`\]]?\s[^,]*"
                for definition in re.finditer(pattern, sql or ""):
                    folding = _SQLITE_FOLDING.search(definition.group())
                    if folding:
                        wrong.append((column, folding.group(1).upper()))
                        break
    if not wrong:
        return
    fixes = "; ".join(_fix(engine, table, column) for column, _ in wrong)
    names = ", ".join(f"{column.name} ({collation})" for column, collation in wrong)
    raise error(
        f"the table {table.name!r} compares {names} by a collation that folds case, accents"
        f" or trailing spaces, so distinct ids would be taken for one; fix it with: {fixes}"
    )


def _fix(engine: Engine, table: sa.Table, column: sa.Column[t.Any]) -> str:
    dialect = engine.dialect
    preparer = dialect.identifier_preparer
    name = preparer.format_table(table)
    quoted = preparer.format_column(column)
    if dialect.name == "sqlite":
        return f"copy {name} into a new table whose {quoted} has no COLLATE clause"
    kind = column.type.compile(dialect)
    if dialect.name == "postgresql":
        return f'ALTER TABLE {name} ALTER COLUMN {quoted} TYPE {kind} COLLATE "C"'
    null = "" if column.nullable else " NOT NULL"
    return f"ALTER TABLE {name} MODIFY {quoted} {kind}{null}"


_E = t.TypeVar("_E", bound=PlointsError)


def database_error(exc: SQLAlchemyError, error: type[_E]) -> _E:
    """``exc`` as an ``error`` with the driver's message only: SQLAlchemy's
    own message echoes the statement's parameters, which hold payloads.
    Raise it from :func:`driver_exception`.
    """
    orig = driver_exception(exc)
    return error(f"database: {type(orig).__name__}: {orig}".strip())


def driver_exception(exc: SQLAlchemyError) -> BaseException:
    """The driver's exception under ``exc``, or ``exc`` when there is none."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


class ManagedTable:
    """A table used by one component, created (if missing) on its first use,
    with the lock that serialises its writes on SQLite.

    :param engine: the engine of the table's database.
    :param table: the table.
    :param create: create it on first use.
    :param error: the component's exception, raised for every database error.
    :param wait: the most seconds a use waits for SQLite's lock; ``None``
        for no bound.
    """

    def __init__(
        self,
        engine: Engine,
        table: sa.Table,
        *,
        create: bool,
        error: type[PlointsError],
        wait: float | None = None,
    ) -> None:
        self.engine = engine
        self.table = table
        self.error = error
        self._creates = create
        # Checked on first use even when the app creates it: its collation.
        self._needs_table = True
        self._create_lock = threading.Lock()
        #: Held around every use of the database on SQLite, which has one
        #: writer at a time (and one shared connection when in memory):
        #: threads queue here rather than on busy timeouts. ``None`` on
        #: other databases.
        self.lock = _WaitedLock(wait, error) if engine.dialect.name == "sqlite" else None
        self._use = _Use(self)

    def ready(self) -> None:
        """Create the table if it is the first use, and check the collation
        of its keys (see :func:`check_collation`).

        :raises PlointsError: the component's error; the database refused.
        """
        if self._needs_table:
            with self._create_lock:
                if self._needs_table:
                    self._create(make=self._creates)

    def create(self) -> None:
        """Create the table and its indexes unless they exist.

        :raises PlointsError: the component's error; the database refused.
        """
        with self._create_lock:
            self._create(make=True)

    def _create(self, *, make: bool) -> None:
        with _Errors(self.error, self.lock):
            if make:
                ensure_table(self.engine, self.table)
            check_collation(self.engine, self.table, self.error)
        self._needs_table = False

    def use(self) -> t.ContextManager[None]:
        """Around a use of the table: create it if it is the first use, take
        SQLite's lock, and raise the database errors of the block as the
        component's error, from the driver's exception.
        """
        return self._use


class _Errors:
    """The database errors of a block as ``error``; on SQLite, the block
    under ``lock``. A class rather than a generator: it runs around every
    store call.
    """

    __slots__ = ("_error", "_lock")

    def __init__(self, error: type[PlointsError], lock: _WaitedLock | None) -> None:
        self._error = error
        self._lock = lock

    def __enter__(self) -> None:
        if self._lock is not None:
            self._lock.__enter__()

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if self._lock is not None:
            self._lock.__exit__()
        if isinstance(exc, SQLAlchemyError):
            raise database_error(exc, self._error) from driver_exception(exc)


class _Use(_Errors):
    """:meth:`ManagedTable.use`: one object for every use."""

    __slots__ = ("_table",)

    def __init__(self, table: ManagedTable) -> None:
        super().__init__(table.error, table.lock)
        self._table = table

    def __enter__(self) -> None:
        # The checks of ready() and of the base class, without their calls.
        if self._table._needs_table:
            self._table.ready()
        if self._lock is not None:
            self._lock.__enter__()


class _WaitedLock:
    """A lock whose wait is bounded: past ``wait`` seconds, ``error``."""

    def __init__(self, wait: float | None, error: type[PlointsError]) -> None:
        self._lock = threading.Lock()
        self._wait = -1 if wait is None else wait
        self._error = error

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=self._wait):
            raise self._error(f"database: SQLite's writer was busy for more than {self._wait:g} s")

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()
