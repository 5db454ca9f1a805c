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

from .statements import Statements

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
    :param events: the statements of the store's table, which the claim
        and the commit that take and end turns build on.
    """

    def __init__(self, table: sa.Table, dialect: str, events: Statements) -> None:
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
        # The turn is free (or lapsed), and the event not stale.
        takeable = sa.and_(
            sa.or_(c.token == _NO_TOKEN, c.turn_ends <= _now),
            sa.or_(sa.not_(remembered), c.newest <= _stamp),
        )
        #: Take the turn.
        self.take = (
            sa.update(table)
            .where(c.order_key == _key, takeable)
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
        self._advanced = {
            "newest": sa.case((stale, c.newest), else_=_stamp),
            "expires": sa.case((stale, c.expires), else_=_keep_until),
        }
        if upsert is not None:
            self.lock_and_advance = (
                upsert.values(
                    order_key=_key,
                    newest=_stamp,
                    expires=_keep_until,
                    token=_NO_TOKEN,
                    turn_ends=_ZERO,
                )
                .on_conflict_do_update(index_elements=[c.order_key], set_=self._advanced)
                .returning(c.newest)
            )
        self._dialect = dialect
        #: PostgreSQL only, by the number of keys (1, or more): the claim
        #: of an id never seen (:attr:`Statements.insert_new`) and, when it
        #: claimed, the turn on each key (``key``, or the list ``keys``)
        #: taken as :attr:`take` does, the key's row inserted if missing, in
        #: one statement that returns no rows: its row count is the number
        #: of turns taken, every key's only when the id was claimed. Empty
        #: elsewhere.
        self.claim_with_turns: dict[int, t.Any] = {}
        #: PostgreSQL only, by the number of turns (1, or more):
        #: :attr:`Statements.commit`, and each turn (``end_key``, held by
        #: ``end_token``; or the lists ``end_keys`` and ``end_tokens``) ended
        #: as :attr:`end_applied` does with its stamp (``end_stamp``, or of
        #: ``end_stamps``), or as :attr:`end_failed` with ``NULL``, in one
        #: statement. Empty elsewhere.
        self.commit_with_turns: dict[int, t.Any] = {}
        if dialect == "postgresql" and events.insert_new is not None:
            # One key is sent as a value: psycopg's adaptation of a list to
            # an array costs more than the fold's own work on the server.
            one_key = sa.select(sa.bindparam("key", type_=sa.String()).label("order_key"))
            many_keys = sa.func.unnest(_many("keys", sa.String())).table_valued("order_key")
            one_end = sa.select(
                sa.bindparam("end_key", type_=sa.String()).label("order_key"),
                sa.bindparam("end_token", type_=sa.String()).label("token"),
                sa.bindparam("end_stamp", type_=sa.BigInteger()).label("stamp"),
            )
            many_ends = sa.func.unnest(
                _many("end_keys", sa.String()),
                _many("end_tokens", sa.String()),
                _many("end_stamps", sa.BigInteger()),
            ).table_valued("order_key", "token", "stamp")
            for count, wanted, ends in (
                (1, one_key.subquery("wanted"), one_end.subquery("ends")),
                (2, many_keys.render_derived("wanted"), many_ends.render_derived("ends")),
            ):
                self.claim_with_turns[count] = self._claim(table, events, takeable, wanted)
                self.commit_with_turns[count] = self._commit(table, events, remembered, ends)

    def hold_with_turn(self, held: Statements) -> t.Any:
        """PostgreSQL only: the held claim of an id never seen
        (:attr:`Statements.insert_held` of ``held``) and, when it claimed,
        the key's row locked and advanced as :attr:`lock_and_advance` does,
        in one statement. One row when it claimed: the claim's token and the
        key's newest after it; none otherwise. ``None`` elsewhere.
        """
        insert_held: t.Any = held.insert_held
        if self._dialect != "postgresql" or insert_held is None:
            return None
        c = self.table.c
        claimed = insert_held.cte("claimed")
        row = sa.select(_key, _stamp, _keep_until, _NO_TOKEN, _ZERO).select_from(claimed)
        advanced = (
            postgresql.insert(self.table)
            .from_select(["order_key", "newest", "expires", "token", "turn_ends"], row)
            .on_conflict_do_update(index_elements=[c.order_key], set_=self._advanced)
            .returning(c.newest)
            .cte("advanced")
        )
        return sa.select(claimed.c.token, advanced.c.newest).select_from(
            claimed.outerjoin(advanced, sa.true())
        )

    @staticmethod
    def _claim(table: sa.Table, events: Statements, takeable: t.Any, wanted: t.Any) -> t.Any:
        c = table.c
        insert_new: t.Any = events.insert_new
        claimed = insert_new.returning(insert_new.table.c.id).cte("claimed")
        # The turn's token is the claim's, and it lasts the claim's lease.
        claim_token = sa.bindparam("claim_token", type_=sa.String())
        lease_end: sa.BindParameter[float] = sa.bindparam("lease_end", type_=sa.Double())
        rows = sa.select(wanted.c.order_key, sa.null(), _ZERO, claim_token, lease_end)
        inserting = postgresql.insert(table).from_select(
            list(table.c.keys()), rows.where(sa.exists(claimed.select()))
        )
        # No RETURNING: reading a result costs the client more than the
        # turn costs the server, and the common answer, every turn taken,
        # is in the row count.
        return inserting.on_conflict_do_update(
            index_elements=[c.order_key],
            set_={"token": inserting.excluded.token, "turn_ends": inserting.excluded.turn_ends},
            where=takeable,
        ).add_cte(claimed)

    @staticmethod
    def _commit(table: sa.Table, events: Statements, remembered: t.Any, ends: t.Any) -> t.Any:
        c = table.c
        applied = ends.c.stamp.is_not(None)
        newer = sa.and_(applied, sa.or_(sa.not_(remembered), c.newest < ends.c.stamp))
        ended = (
            sa.update(table)
            .where(c.order_key == ends.c.order_key, c.token == ends.c.token)
            .values(
                newest=sa.case((newer, ends.c.stamp), else_=c.newest),
                expires=sa.case((applied, _keep_until), else_=c.expires),
                token=_NO_TOKEN,
                turn_ends=_ZERO,
            )
            .cte("ended")
        )
        return events.commit.add_cte(ended)


def _many(name: str, kind: sa.types.TypeEngine[t.Any]) -> sa.BindParameter[t.Any]:
    return sa.bindparam(name, type_=postgresql.ARRAY(kind))
