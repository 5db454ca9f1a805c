"""The delivery log's table, and the rows it reads back as :class:`Delivery`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

import sqlalchemy as sa

__all__ = [
    "MAX_ID",
    "MAX_REASON",
    "MAX_TRACEBACK",
    "OUTCOMES",
    "Delivery",
    "delivery",
    "make_table",
]

#: The largest row id: the columns are 64-bit.
MAX_ID = 2**63 - 1
#: Every outcome a row can record, in the order the page lists them.
OUTCOMES: tuple[str, ...] = ("processed", "duplicate", "failed", "rejected")

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
        failure; ``None`` otherwise.
    :param payload: the raw body of a verified event; never kept for a
        rejected request.
    :param traceback: the handler's traceback, for ``failed``.
    :param duration: seconds spent in the handlers, for ``processed`` and
        ``failed``.

    .. versionadded:: 0.1
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


def make_table(name: str) -> sa.Table:
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
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=True),
        sa.Column("event_type", sa.String(128), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(MAX_REASON), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("duration", sa.Double(), nullable=True),
    )
    sa.Index(f"ix_{name}_received_at", table.c.received_at)
    sa.Index(f"ix_{name}_event_id", table.c.event_id)
    return table


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
    )
