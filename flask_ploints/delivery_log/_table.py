"""The delivery log's table (with the search text kept with each row), and
the rows it reads back as :class:`Delivery`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import json
import logging
import typing as t
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from ..stores._sql.tables import Key

if t.TYPE_CHECKING:
    from .._errors import PlointsError

__all__ = [
    "MAX_ID",
    "MAX_REASON",
    "MAX_SEARCH",
    "MAX_TRACEBACK",
    "OUTCOMES",
    "Delivery",
    "check_columns",
    "delivery",
    "make_table",
    "search_index",
    "search_text",
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

    .. versionadded:: 0.2
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


#: Longest client address kept (an IPv6 address with a zone fits).
MAX_CLIENT = 64
#: Longest search text kept for a row, in characters: four bytes each in
#: MariaDB's utf8mb4 stay under its TEXT's 65,535 bytes.
MAX_SEARCH = 16_000


def make_table(name: str) -> sa.Table:
    """The log's table ``name``, with its columns and indexes."""
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
        # MySQL's BLOB holds 64 KiB; a body may be PLOINTS_WEBHOOK_MAX_BYTES.
        sa.Column(
            "payload",
            sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("duration", sa.Double(), nullable=True),
        sa.Column("account", Key(128), nullable=True),
        sa.Column("status", sa.SmallInteger(), nullable=True),
        sa.Column("client", sa.String(MAX_CLIENT), nullable=True),
        # The lowercased text that ``?q=`` searches (see search_text).
        sa.Column("search", sa.Text(), nullable=True),
    )
    sa.Index(f"ix_{name}_received_at", table.c.received_at)
    sa.Index(f"ix_{name}_event_id", table.c.event_id)
    # The page's list of event types walks it, not the table.
    sa.Index(f"ix_{name}_event_type", table.c.event_type)
    sa.Index(f"ix_{name}_account", table.c.account)
    return table


def check_columns(engine: sa.Engine, table: sa.Table, error: type[PlointsError]) -> None:
    """Raise ``error`` when the database's ``table`` lacks a column of
    :func:`make_table` (a table made by a pre-release build, or by hand),
    with the statements that add them and their indexes.

    :raises sqlalchemy.exc.SQLAlchemyError: the database refused.
    """
    with engine.connect() as connection:
        present = {column["name"] for column in sa.inspect(connection).get_columns(table.name)}
    missing = [column for column in table.columns if column.name not in present]
    if not missing:
        return
    dialect = engine.dialect
    preparer = dialect.identifier_preparer
    fixes = [
        f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN"
        f" {preparer.format_column(column)} {column.type.compile(dialect)}"
        f"{'' if column.nullable else ' NOT NULL'}"
        for column in missing
    ]
    fixes.extend(
        str(sa.schema.CreateIndex(index).compile(dialect=dialect))
        for index in sorted(table.indexes, key=lambda index: str(index.name))
        if any(column in missing for column in index.columns)
    )
    names = ", ".join(column.name for column in missing)
    raise error(
        f"the table {table.name!r} lacks the column{'' if len(missing) == 1 else 's'} {names}"
        f" of the delivery log; fix it with: {'; '.join(fixes)}"
    )


def _values(value: object) -> t.Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _values(item)
    elif isinstance(value, bool):
        yield "true" if value else "false"
    elif value is not None:
        yield str(value)


def search_text(event_id: str, raw: bytes) -> str:
    """The lowercased text that ``?q=`` searches: the event id, then every
    value of the payload (not its keys), one a line.
    """
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    # NUL is not text to PostgreSQL; the sender's values never hold it.
    text = "\n".join([event_id, *_values(parsed)]).replace("\x00", "")
    return text.lower()[:MAX_SEARCH]


def search_index(engine: sa.Engine, table: sa.Table) -> bool:
    """On PostgreSQL, create the trigram index (``pg_trgm``'s GIN) that
    makes ``?q=`` a lookup rather than a scan, and the extension if it is
    missing; return whether the index exists. Other databases scan: a
    substring is found by no index of theirs.
    """
    if engine.dialect.name != "postgresql":
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
        account=row.account,
        status=row.status,
        client=row.client,
    )
