"""The table of ``latest_by``'s state in the SQL stores, and its statements:
per key, the newest timestamp a handler applied and the turn in progress.
See :mod:`flask_ploints._ordering`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite

__all__ = ["OrderStatements", "make_order_table"]

_key = sa.bindparam("ordered", type_=sa.String())
_token = sa.bindparam("turn_token", type_=sa.String())
_stamp: sa.BindParameter[int] = sa.bindparam("stamp", type_=sa.BigInteger())
_now: sa.BindParameter[float] = sa.bindparam("now", type_=sa.Double())
_turn_end: sa.BindParameter[float] = sa.bindparam("turn_end", type_=sa.Double())
_keep_until: sa.BindParameter[float] = sa.bindparam("keep_until", type_=sa.Double())
_NO_TOKEN = sa.literal_column("''", sa.String())
_ZERO: sa.ColumnElement[float] = sa.literal_column("0", sa.Double())


def make_order_table(name: str) -> sa.Table:
    """The table ``name`` of ``latest_by``'s state."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("order_key", sa.String(255), primary_key=True),
        # Milliseconds since the epoch of the newest event applied; NULL
        # before the first.
        sa.Column("newest", sa.BigInteger(), nullable=True),
        # Until when ``newest`` is remembered (the store's clock, seconds).
        sa.Column("expires", sa.Double(), nullable=False),
        # The turn in progress ('' for none), and when it lapses.
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("turn_ends", sa.Double(), nullable=False),
    )


class OrderStatements:
    """Every statement on an order table, built once.

    :param table: the table, from :func:`make_order_table`.
    :param dialect: the name of the database's dialect.
    """

    def __init__(self, table: sa.Table, dialect: str) -> None:
        c = table.c
        self.table = table
        remembered = sa.and_(c.newest.is_not(None), c.expires > _now)
        row = {
            "order_key": _key,
            "newest": sa.null(),
            "expires": _ZERO,
            "token": _NO_TOKEN,
            "turn_ends": _ZERO,
        }
        insert: t.Any
        upsert: t.Any = None
        if dialect == "postgresql":
            insert = postgresql.insert(table).values(row).on_conflict_do_nothing()
            upsert = postgresql.insert(table)
        elif dialect == "sqlite":
            insert = sqlite.insert(table).values(row).on_conflict_do_nothing()
            upsert = sqlite.insert(table)
        elif dialect in ("mysql", "mariadb"):
            insert = mysql.insert(table).values(row).prefix_with("IGNORE")
        else:
            insert = sa.insert(table).values(row)
        #: Insert the key's row unless it exists.
        self.insert = insert
        #: Take the turn: free (or lapsed), and the event not stale.
        self.take = (
            sa.update(table)
            .where(
                c.order_key == _key,
                sa.or_(c.token == _NO_TOKEN, c.turn_ends <= _now),
                sa.or_(sa.not_(remembered), c.newest <= _stamp),
            )
            .values(token=_token, turn_ends=_turn_end)
        )
        #: The key's row, to say why the turn was not taken.
        self.read = sa.select(c.newest, c.expires, c.token, c.turn_ends).where(c.order_key == _key)
        #: The key's row, locked until the transaction ends (the session
        #: store; SQLite's transaction holds the database's write lock).
        self.lock = self.read.with_for_update()
        newest = sa.case((sa.or_(sa.not_(remembered), c.newest < _stamp), _stamp), else_=c.newest)
        # Newest first: MySQL assigns left to right, and must read the old
        # expiry.
        #: End a turn that applied ``stamp``.
        self.end_applied = (
            sa.update(table)
            .where(c.order_key == _key, c.token == _token)
            .ordered_values(
                (c.newest, newest),
                (c.expires, _keep_until),
                (c.token, _NO_TOKEN),
                (c.turn_ends, _ZERO),
            )
        )
        #: End a turn whose handler failed: nothing advances.
        self.end_failed = (
            sa.update(table)
            .where(c.order_key == _key, c.token == _token)
            .values(token=_NO_TOKEN, turn_ends=_ZERO)
        )
        #: Advance the key in the transaction that holds its lock.
        self.advance = (
            sa.update(table)
            .where(c.order_key == _key)
            .ordered_values((c.newest, newest), (c.expires, _keep_until))
        )
        stale = sa.and_(remembered, c.newest > _stamp)
        #: Lock the key's row, inserting it, and advance it to ``stamp``
        #: unless that is stale, in one statement that returns the newest
        #: after it (newer than ``stamp`` when stale): the session store's
        #: turn, in the transaction that commits or rolls back the advance
        #: with the handlers' writes. ``None`` where the database has no
        #: ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``.
        self.lock_and_advance: t.Any = None
        if upsert is not None:
            self.lock_and_advance = (
                upsert.values(
                    order_key=_key,
                    newest=_stamp,
                    expires=_keep_until,
                    token=_NO_TOKEN,
                    turn_ends=_ZERO,
                )
                .on_conflict_do_update(
                    index_elements=[c.order_key],
                    set_={
                        "newest": sa.case((stale, c.newest), else_=_stamp),
                        "expires": sa.case((stale, c.expires), else_=_keep_until),
                    },
                )
                .returning(c.newest)
            )
