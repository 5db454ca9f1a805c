"""Bounded waits for another transaction's row lock, per dialect, for a
claim held in the transaction of the handlers' writes.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import typing as t

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["bounded_lock_wait", "is_lock_wait"]

# SQLSTATE of PostgreSQL's lock_timeout; MySQL's lock wait timeout and
# deadlock error numbers.
_PG_LOCK_NOT_AVAILABLE = "55P03"
_MYSQL_LOCK_ERRORS = frozenset({1205, 1213})


@contextlib.contextmanager
def bounded_lock_wait(connection: Connection, seconds: float) -> t.Iterator[None]:
    """Bound the wait for another transaction's row lock to ``seconds``.
    PostgreSQL's held claim bounds its own (``lock_wait``, see
    :class:`~flask_ploints.stores.sql.statements.Statements`).
    """
    dialect = connection.dialect.name
    if dialect == "sqlite":
        before = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            yield
        finally:
            connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(before or 0)}")
    elif dialect in ("mysql", "mariadb"):
        connection.exec_driver_sql(
            "SET @ploints_lock_wait = @@innodb_lock_wait_timeout,"
            f" innodb_lock_wait_timeout = {max(1, round(seconds))}"
        )
        try:
            yield
        finally:
            connection.exec_driver_sql("SET innodb_lock_wait_timeout = @ploints_lock_wait")
    else:
        yield


def is_lock_wait(exc: SQLAlchemyError) -> bool:
    """Whether ``exc`` is a lock wait that ran out, not a failure."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == _PG_LOCK_NOT_AVAILABLE:
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in _MYSQL_LOCK_ERRORS:
        return True
    return "database is locked" in str(orig)
