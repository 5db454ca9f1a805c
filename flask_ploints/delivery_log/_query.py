"""The delivery log's filters as SQL: the list's, the exports', the bulk
re-run's and the chart's.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

import sqlalchemy as sa

__all__ = ["Filters", "distinct", "histogram", "select_rows", "where"]


@dataclass(frozen=True)
class Filters:
    """What a view of the log selects; ``None`` selects everything.

    :param accounts: only the rows of these accounts (none for an empty
        collection): the access check's scoping.
    :param q: a substring of the event id or of any value in the payload,
        compared case-insensitively.
    :param since: only rows received at or after, in seconds since the
        epoch.
    :param until: only rows received before.
    """

    event_type: str | None = None
    outcome: str | None = None
    outcomes: t.Collection[str] | None = None
    event_id: str | None = None
    before: int | None = None
    account: str | None = None
    accounts: t.Collection[str] | None = None
    q: str | None = None
    since: float | None = None
    until: float | None = None

    def wanted(self) -> set[str] | None:
        """The accounts whose rows may be selected; ``None`` for every one."""
        wanted = None if self.accounts is None else set(self.accounts)
        if self.account is not None:
            wanted = {self.account} if wanted is None else wanted & {self.account}
        return wanted


def where(table: sa.Table, filters: Filters) -> list[sa.ColumnElement[bool]] | None:
    """The conditions of ``filters`` on ``table``; ``None`` when they select
    nothing (no admitted account).
    """
    c = table.c
    conditions: list[sa.ColumnElement[bool]] = []
    if filters.event_type is not None:
        conditions.append(c.event_type == filters.event_type)
    if filters.outcome is not None:
        conditions.append(c.outcome == filters.outcome)
    if filters.outcomes is not None:
        conditions.append(c.outcome.in_(list(filters.outcomes)))
    if filters.event_id is not None:
        conditions.append(c.event_id == filters.event_id)
    if filters.before is not None:
        conditions.append(c.id < filters.before)
    if filters.since is not None:
        conditions.append(c.received_at >= filters.since)
    if filters.until is not None:
        conditions.append(c.received_at < filters.until)
    if filters.q:
        conditions.append(c.search.contains(filters.q.lower(), autoescape=True))
    wanted = filters.wanted()
    if wanted is not None:
        if not wanted:
            return None
        conditions.append(c.account.in_(sorted(wanted)))
    return conditions


def select_rows(table: sa.Table, filters: Filters, limit: int) -> sa.Select[t.Any] | None:
    """The newest ``limit`` rows that ``filters`` select, or ``None`` for
    none.
    """
    conditions = where(table, filters)
    if conditions is None:
        return None
    return sa.select(table).where(*conditions).order_by(table.c.id.desc()).limit(max(limit, 0))


def distinct(
    table: sa.Table, name: str, conditions: list[sa.ColumnElement[bool]], dialect: str
) -> sa.Select[t.Any]:
    """The distinct values of the column ``name`` (but ``NULL``) of the rows
    that ``conditions`` select. On PostgreSQL, a walk of the column's index
    from one value to the next, as it has no skip scan of its own: a few
    lookups rather than a scan of every row. MariaDB skips through the
    index for a ``DISTINCT`` itself, and allows no such walk.
    """
    column = table.c[name]
    if dialect != "postgresql":
        return sa.select(column).where(column.is_not(None), *conditions).distinct()
    walk = (
        sa.select(sa.func.min(column).label("value"))
        .where(column.is_not(None), *conditions)
        .cte("walk", recursive=True)
    )
    step = sa.select(sa.func.min(column)).where(column > walk.c.value, *conditions)
    walk = walk.union_all(sa.select(step.scalar_subquery()).where(walk.c.value.is_not(None)))
    return sa.select(walk.c.value).where(walk.c.value.is_not(None))


def histogram(
    connection: sa.Connection,
    table: sa.Table,
    filters: Filters,
    start: float,
    width: float,
    buckets: int,
) -> dict[str, list[int]]:
    """Count the rows of each outcome in ``buckets`` periods of ``width``
    seconds from ``start``, as selected by ``filters`` (whose ``since`` and
    ``until`` are replaced by the buckets' bounds).
    """
    bounded = Filters(
        event_type=filters.event_type,
        account=filters.account,
        accounts=filters.accounts,
        q=filters.q,
        since=start,
        until=start + width * buckets,
    )
    conditions = where(table, bounded)
    counts: dict[str, list[int]] = {}
    if conditions is None:
        return counts
    offset = (table.c.received_at - start) / width
    # SQLite's CAST truncates, which is the floor of these positive
    # offsets; PostgreSQL's and MariaDB's round, so they have floor().
    if connection.dialect.name == "sqlite":
        bucket: sa.ColumnElement[t.Any] = sa.cast(offset, sa.Integer)
    else:
        bucket = sa.func.floor(offset)
    wanted = filters.wanted()
    # Scoped, grouped by account too, so that each is compared again
    # exactly: a case-insensitive collation finds "ACME" for "acme", and
    # MariaDB's groups them too unless grouped by their bytes.
    account: sa.ColumnElement[t.Any] = table.c.account
    if connection.dialect.name in ("mysql", "mariadb"):
        account = sa.cast(account, sa.LargeBinary)
    grouped = [table.c.outcome, bucket] + ([] if wanted is None else [account.label("account")])
    statement = (
        sa.select(*grouped, sa.func.count().label("n")).where(*conditions).group_by(*grouped)
    )
    for row in connection.execute(statement):
        name = row.account if wanted is not None else None
        if isinstance(name, bytes):
            name = name.decode()
        if wanted is not None and name not in wanted:
            continue
        index = min(max(int(row[1]), 0), buckets - 1)
        counts.setdefault(row.outcome, [0] * buckets)[index] += int(row.n)
    return counts
