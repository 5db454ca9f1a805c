"""The delivery log's table, and the rows it reads back as :class:`Delivery`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t
from dataclasses import dataclass

import sqlalchemy as sa

from ..stores._sql.tables import Key
from ..stores._sql.tables import ManagedTable

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
    :param status: the HTTP status a rejected request was answered.
    :param client: the address a rejected request came from
        (``request.remote_addr``, the real client's behind ``ProxyFix``).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
        The ``account``, ``status`` and ``client`` fields.
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
    status: int | None = None
    client: str | None = None


#: The column that 0.2 added, for endpoints of many accounts; a table made by
#: 0.1 gets it on first use (see :func:`upgrade_table`).
ACCOUNT_COLUMN = "account"
#: The columns 0.2 added, each nullable: the account; a rejected request's
#: status and client address; the lowercased text that ``?q=`` searches.
ADDED_COLUMNS: tuple[str, ...] = (ACCOUNT_COLUMN, "status", "client", "search")
#: Longest client address kept (an IPv6 address with a zone fits).
MAX_CLIENT = 64


def _added_column(name: str) -> sa.Column[t.Any]:
    if name == "status":
        return sa.Column("status", sa.SmallInteger(), nullable=True)
    if name == "client":
        return sa.Column("client", sa.String(MAX_CLIENT), nullable=True)
    if name == "search":
        return sa.Column("search", sa.Text(), nullable=True)
    return sa.Column(name, Key(128), nullable=True)


def make_table(
    name: str, *, account: bool = True, added: t.Iterable[str] | None = None
) -> sa.Table:
    """The log's table ``name``, with the columns of :data:`ADDED_COLUMNS`
    in ``added`` (default, all of them): fewer for a table of 0.1 that the
    app migrates itself. ``account`` false leaves the account column out.
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
    # Of 0.2: the page's list of event types walks it, not the table.
    sa.Index(f"ix_{name}_event_type", table.c.event_type)
    wanted = set(ADDED_COLUMNS if added is None else added)
    if not account:
        wanted.discard(ACCOUNT_COLUMN)
    for column in ADDED_COLUMNS:
        if column in wanted:
            table.append_column(_added_column(column))
    if ACCOUNT_COLUMN in wanted:
        sa.Index(f"ix_{name}_account", table.c.account)
    return table


def add_column_statement(engine: sa.Engine, table: sa.Table, name: str) -> str:
    """The ``ALTER TABLE`` that adds the column ``name`` of
    :data:`ADDED_COLUMNS` to ``table``, as the docs tell an app that
    migrates its table itself.
    """
    column = table.c[name] if name in table.c else _added_column(name)
    preparer = engine.dialect.identifier_preparer
    return (
        f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN"
        f" {preparer.format_column(column)} {column.type.compile(engine.dialect)}"
    )


def missing_columns(connection: sa.Connection, table: sa.Table) -> list[str]:
    """The columns of :data:`ADDED_COLUMNS` that the database's ``table``
    lacks.
    """
    present = {column["name"] for column in sa.inspect(connection).get_columns(table.name)}
    return [name for name in ADDED_COLUMNS if name not in present]


def has_account_column(connection: sa.Connection, table: sa.Table) -> bool:
    """Whether the database's ``table`` has the account column."""
    return ACCOUNT_COLUMN not in missing_columns(connection, table)


def upgrade_table(engine: sa.Engine, table: sa.Table, *, alter: bool) -> list[str]:
    """Give a table created before the columns of :data:`ADDED_COLUMNS`
    those it lacks, and the account's index, when ``alter`` allows it:
    ``ALTER TABLE ... ADD COLUMN``, nullable columns, so old rows read as of
    no account, status, client or search text. Return the columns the table
    still lacks.

    :raises sqlalchemy.exc.SQLAlchemyError: the database refused.
    """
    with engine.connect() as connection:
        missing = missing_columns(connection, table)
    if missing and alter:
        for name in missing:
            try:
                with engine.begin() as connection:
                    connection.execute(sa.text(add_column_statement(engine, table, name)))
            except sa.exc.SQLAlchemyError:
                # Another process added it between the check and the ALTER.
                with engine.connect() as connection:
                    if name in missing_columns(connection, table):
                        raise
        missing = []
    if alter:
        for suffix in ("account", "event_type"):
            index = next(
                index for index in table.indexes if index.name == f"ix_{table.name}_{suffix}"
            )
            try:
                index.create(engine, checkfirst=True)
            except sa.exc.SQLAlchemyError:
                # Created by another process meanwhile; the second check sees it.
                index.create(engine, checkfirst=True)
        search_index(engine, table)
    return missing


def search_index(engine: sa.Engine, table: sa.Table) -> bool:
    """On PostgreSQL, create the trigram index (``pg_trgm``'s GIN) that
    makes ``?q=`` a lookup rather than a scan, and the extension if it is
    missing; return whether the index exists. Other databases scan: a
    substring is found by no index of theirs.
    """
    if engine.dialect.name != "postgresql" or "search" not in table.c:
        return False
    preparer = engine.dialect.identifier_preparer
    index = preparer.quote(f"ix_{table.name}_search")
    statement = (
        f"CREATE INDEX IF NOT EXISTS {index} ON {preparer.format_table(table)}"
        f" USING gin ({preparer.quote('search')} gin_trgm_ops)"
    )
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        with engine.begin() as connection:
            connection.execute(sa.text(statement))
    except sa.exc.SQLAlchemyError as exc:
        logger.warning(
            "the delivery log's search scans table %r: its trigram index could not be created"
            " (%s); run CREATE EXTENSION pg_trgm as a superuser, then %s",
            table.name,
            type(exc).__name__,
            statement,
        )
        return False
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
        status=row._mapping.get("status"),
        client=row._mapping.get("client"),
    )


def upgraded(managed: ManagedTable, *, alter: bool) -> sa.Table:
    """Return the table a log of ``managed`` uses, after
    :func:`upgrade_table`: without the account column when the app keeps
    migrating a table of 0.1 itself.

    :raises flask_ploints._errors.DeliveryLogError: the database refused.
    """
    table = managed.table
    with managed.use():
        missing = upgrade_table(managed.engine, table, alter=alter)
    if not missing:
        return table
    them = "it" if len(missing) == 1 else "them"
    logger.warning(
        "the delivery log's table %r lacks the column%s %s of 0.2: add %s with your migrations"
        " (%s); until then, rows are kept without %s",
        table.name,
        "" if len(missing) == 1 else "s",
        ", ".join(missing),
        them,
        "; ".join(add_column_statement(managed.engine, table, name) for name in missing),
        them,
    )
    return make_table(table.name, added=[name for name in ADDED_COLUMNS if name not in missing])
