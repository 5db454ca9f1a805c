"""The delivery log's table, and the rows it reads back as :class:`Delivery`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t
from dataclasses import dataclass

import sqlalchemy as sa

from ..stores.sql.tables import Key
from ..stores.sql.tables import ManagedTable

__all__ = [
    "MAX_ID",
    "MAX_REASON",
    "MAX_TRACEBACK",
    "OUTCOMES",
    "Delivery",
    "delivery",
    "make_table",
    "upgrade_table",
    "upgraded",
]

logger = logging.getLogger("flask_ploints")

#: The largest row id: the columns are 64-bit.
MAX_ID = 2**63 - 1
#: Every outcome a row can record, in the order the page lists them.
OUTCOMES: tuple[str, ...] = ("processed", "duplicate", "failed", "queued", "retrying", "rejected")

#: Longest reason kept; reasons are short fixed strings of the receiver.
MAX_REASON = 500
#: Longest traceback kept, in characters: the end is kept, where the error is.
MAX_TRACEBACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Delivery:
    """One recorded delivery outcome.

    :param id: the row's id, increasing with time.
    :param received_at: when the delivery arrived, in seconds since the
        epoch.
    :param name: the :class:`~flask_ploints.PlointsWebhooks` instance that
        answered it.
    :param event_id: the event id; ``None`` for a rejected request.
    :param event_type: the event type; ``None`` for a rejected request.
    :param outcome: one of :data:`OUTCOMES`.
    :param reason: why a request was rejected, or the last line of a
        failure (of a ``retrying`` attempt, after its number and when the
        next one runs); ``None`` otherwise.
    :param payload: the raw body of a verified event; never kept for a
        rejected request.
    :param traceback: the handler's traceback, for ``failed`` and
        ``retrying``.
    :param duration: seconds spent in the handlers, for ``processed`` and
        ``failed``.
    :param account: the account of an endpoint for many accounts that the
        delivery came to; ``None`` for an endpoint of one.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
        The ``account`` field.
    """

    id: int
    received_at: float
    name: str
    event_id: str | None
    event_type: str | None
    outcome: str
    reason: str | None
    payload: bytes | None
    traceback: str | None
    duration: float | None
    account: str | None = None


#: The column that 0.2 added, for endpoints of many accounts; a table made by
#: 0.1 gets it on first use (see :func:`upgrade_table`).
ACCOUNT_COLUMN = "account"


def make_table(name: str, *, account: bool = True) -> sa.Table:
    """The log's table ``name``; without its account column (``account``
    false) for a table of 0.1 that the app migrates itself.
    """
    table = sa.Table(
        name,
        sa.MetaData(),
        # 64-bit where the database has it; SQLite's rowid is 64-bit already,
        # and autoincrements only as INTEGER.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        # Float seconds since the epoch, as in SQLAlchemyStore: compared the
        # same way by every dialect.
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("name", Key(128), nullable=False),
        sa.Column("event_id", Key(255), nullable=True),
        sa.Column("event_type", sa.String(128), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(MAX_REASON), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("duration", sa.Double(), nullable=True),
    )
    sa.Index(f"ix_{name}_received_at", table.c.received_at)
    sa.Index(f"ix_{name}_event_id", table.c.event_id)
    if account:
        table.append_column(sa.Column(ACCOUNT_COLUMN, Key(128), nullable=True))
        sa.Index(f"ix_{name}_account", table.c.account)
    return table


def has_account_column(connection: sa.Connection, table: sa.Table) -> bool:
    """Whether the database's ``table`` has the account column."""
    columns = sa.inspect(connection).get_columns(table.name)
    return any(column["name"] == ACCOUNT_COLUMN for column in columns)


def upgrade_table(engine: sa.Engine, table: sa.Table, *, alter: bool) -> bool:
    """Give a table created before 0.2 its account column and index, when
    ``alter`` allows it: ``ALTER TABLE ... ADD COLUMN``, a nullable column,
    so old rows read as of no account. Return whether the table has the
    column now.

    :raises sqlalchemy.exc.SQLAlchemyError: the database refused.
    """
    with engine.connect() as connection:
        if has_account_column(connection, table):
            return True
    if not alter:
        return False
    column = table.c[ACCOUNT_COLUMN]
    preparer = engine.dialect.identifier_preparer
    statement = (
        f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN"
        f" {preparer.format_column(column)} {column.type.compile(engine.dialect)}"
    )
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(statement))
    except sa.exc.SQLAlchemyError:
        # Another process added it between the check and the ALTER.
        with engine.connect() as connection:
            if not has_account_column(connection, table):
                raise
    index = next(index for index in table.indexes if index.name == f"ix_{table.name}_account")
    try:
        index.create(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError:
        # Created by another process meanwhile; the second check sees it.
        index.create(engine, checkfirst=True)
    return True


def delivery(row: sa.Row[t.Any]) -> Delivery:
    return Delivery(
        id=row.id,
        received_at=row.received_at,
        name=row.name,
        event_id=row.event_id,
        event_type=row.event_type,
        outcome=row.outcome,
        reason=row.reason,
        payload=None if row.payload is None else bytes(row.payload),
        traceback=row.traceback,
        duration=row.duration,
        # A table of 0.1 that the app has not migrated has no such column.
        account=row._mapping.get(ACCOUNT_COLUMN),
    )


def upgraded(managed: ManagedTable, *, alter: bool) -> sa.Table:
    """Return the table a log of ``managed`` uses, after
    :func:`upgrade_table`: without the account column when the app keeps
    migrating a table of 0.1 itself.

    :raises flask_ploints.errors.DeliveryLogError: the database refused.
    """
    table = managed.table
    with managed.use():
        has_account = upgrade_table(managed.engine, table, alter=alter)
    if has_account:
        return table
    logger.warning(
        "the delivery log's table %r has no account column: add it with your migrations (see"
        " the delivery log's docs); rows are kept without their account until then",
        table.name,
    )
    return make_table(table.name, account=False)
