"""The claim held in the transaction of the handlers' writes: its
statements, and its bounded waits for another transaction's row lock, per
dialect.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import secrets
import typing as t

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import SQLAlchemyError

from .._base import EventState
from .statements import Holder
from .statements import holder

__all__ = ["bounded_lock_wait", "hold_row", "is_lock_wait"]

_CLAIM_ROUNDS = 5

# SQLSTATE of PostgreSQL's lock_timeout; MySQL's lock wait timeout and
# deadlock error numbers.
_PG_LOCK_NOT_AVAILABLE = "55P03"
_MYSQL_LOCK_ERRORS = frozenset({1205, 1213})


@contextlib.contextmanager
def bounded_lock_wait(connection: Connection, seconds: float) -> t.Iterator[None]:
    """Bound the wait for another transaction's row lock to ``seconds``.
    PostgreSQL's held claim bounds its own (``lock_wait``, see
    :class:`~flask_ploints.stores._sql.statements.Statements`).
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
    """Whether ``exc`` is a wait for another transaction's row lock that ran
    out, not a failure. SQLite's lock is the whole database's: a wait for it
    cannot tell a concurrent delivery of the id from any other writer (or a
    stuck one), so it is a failure of the store.
    """
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == _PG_LOCK_NOT_AVAILABLE:
        return True
    args: tuple[object, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _MYSQL_LOCK_ERRORS


def hold_row(
    connection: Connection,
    sql: t.Any,
    params: dict[str, t.Any],
    lease: float,
    retention: float,
    clock: t.Callable[[], float],
    lock_timeout: float,
    adopt: bool,
) -> Holder | None:
    """Write the held claim's row in ``connection``'s transaction with the
    held :class:`~flask_ploints.stores._sql.statements.Statements` ``sql``:
    ours (done, kept until ``retention`` from now) when the id is free, or
    with ``adopt`` the worker's claim of ``params["claim_token"]`` taken
    over; else who holds it. ``None`` when it kept racing.
    """
    dialect = connection.dialect.name
    with bounded_lock_wait(connection, lock_timeout):
        for _ in range(_CLAIM_ROUNDS):
            now = params["now"] = clock()
            params["lease_end"] = now + lease
            params["keep_until"] = now + retention
            if adopt:
                # The worker's own claim, marked done in the transaction.
                taken = connection.execute(sql.commit, params)
                if taken.rowcount == 1:
                    return Holder(params["claim_token"], EventState.DONE, 0.0, 0.0)
                params["claim_token"] = secrets.token_hex(8)
                adopt = False
            if sql.insert_held is not None and connection.execute(sql.insert_held, params).first():
                return Holder(params["claim_token"], EventState.DONE, 0.0, 0.0)
            if sql.claim is not None:
                found = holder(connection.execute(sql.claim, params).first())
            elif dialect == "sqlite":
                assert sql.upsert is not None
                found = holder(connection.execute(sql.upsert, params).first())
                if found is None:
                    found = holder(connection.execute(sql.holder, params).first())
            else:
                found = _insert_or_take_over(connection, sql, params)
            if found is not None:
                return found
    return None


def _insert_or_take_over(
    connection: Connection, sql: t.Any, params: dict[str, t.Any]
) -> Holder | None:
    ours = Holder(params["claim_token"], EventState.DONE, 0.0, 0.0)
    try:
        # Not for the transaction: so that racing claims of one id never deadlock.
        with connection.begin_nested():
            connection.execute(sql.insert, params)
        return ours
    except IntegrityError:
        pass
    if connection.execute(sql.take_over, params).rowcount == 1:
        return ours
    return holder(connection.execute(sql.holder_locked, params).first())
