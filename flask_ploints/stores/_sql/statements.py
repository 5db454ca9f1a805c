"""The store's table, and every statement on it, built once per store.

A call of the store only executes: the statements take their values as bind
parameters, and the rows they return are read into :class:`Holder` and
:class:`~flask_ploints.stores._base.StoredEvent`.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .._base import EventState
from .._base import StoredEvent
from .tables import Key

__all__ = ["Holder", "Statements", "holder", "make_table", "stored"]


# The parameters' names differ from the column names, which SQLAlchemy keeps
# for the VALUES and SET clauses of INSERT and UPDATE.
_event_id = sa.bindparam("event_id", type_=sa.String())
_token = sa.bindparam("claim_token", type_=sa.String())
_now: sa.BindParameter[float] = sa.bindparam("now", type_=sa.Double())
_lease_end: sa.BindParameter[float] = sa.bindparam("lease_end", type_=sa.Double())
_keep_until: sa.BindParameter[float] = sa.bindparam("keep_until", type_=sa.Double())
_payload = sa.bindparam("body", type_=sa.LargeBinary())
_error = sa.bindparam("reason", type_=sa.Text())


def _state(state: EventState) -> sa.ColumnElement[str]:
    # Written into the SQL rather than sent: fewer parameters to adapt per call.
    return sa.literal_column(f"'{state.value}'", sa.String())


_IN_FLIGHT = _state(EventState.IN_FLIGHT)
_DONE = _state(EventState.DONE)
_FAILED = _state(EventState.FAILED)
_ONE = sa.literal_column("1", sa.Integer())


#: Dialects with partial indexes: the index of failed rows holds those only.
_PARTIAL_INDEXES = frozenset({"postgresql", "sqlite"})


def make_table(name: str, dialect: str) -> sa.Table:
    """The table of a store, named ``name``, with its index for ``dialect``
    (the name of the database's dialect).
    """
    table = sa.Table(
        name,
        sa.MetaData(),
        # Compared byte for byte: see Key.
        sa.Column("id", Key(255), primary_key=True),
        # One of EventState's values.
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        # Float seconds since the epoch from the store's clock: compared the
        # same way in every dialect, at the cost of synchronised clocks.
        sa.Column("lease_expires", sa.Double(), nullable=False),
        sa.Column("expires", sa.Double(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "payload",
            sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    if dialect in _PARTIAL_INDEXES:
        # Of failed rows only: a claim inserts, and a commit updates, no
        # entry of it, and PostgreSQL's commit writes one index fewer.
        failed = table.c.status == _FAILED
        sa.Index(
            f"ix_{name}_failed", table.c.updated_at, postgresql_where=failed, sqlite_where=failed
        )
    else:
        sa.Index(f"ix_{name}_status_updated", table.c.status, table.c.updated_at)
    return table


def _take_over(
    c: t.Any,
    token: t.Any,
    lease_end: t.Any,
    payload: t.Any,
    now: t.Any,
    state: sa.ColumnElement[str],
    expires: t.Any,
) -> tuple[sa.ColumnElement[bool], dict[str, t.Any]]:
    """When a claim may take over an existing row, and what it sets then,
    given the claim's values as SQL expressions.
    """
    # Failed, its lease ran out, or done and past its retention.
    free = sa.or_(
        c.status == _FAILED,
        sa.and_(c.status == _IN_FLIGHT, c.lease_expires <= now),
        sa.and_(c.status == _DONE, c.expires <= now),
    )
    # A row past its retention is forgotten: the claim starts it afresh.
    forgotten = sa.and_(c.status != _IN_FLIGHT, c.expires <= now)
    old_payload = sa.case((forgotten, sa.null()), else_=c.payload)
    return free, {
        "status": state,
        "token": token,
        "lease_expires": lease_end,
        "expires": expires,
        "attempts": sa.case((forgotten, _ONE), else_=c.attempts + _ONE),
        "error": sa.case((forgotten, sa.null()), else_=c.error),
        # A claim without a payload keeps the last one.
        "payload": sa.func.coalesce(payload, old_payload, type_=sa.LargeBinary()),
        "created_at": sa.case((forgotten, now), else_=c.created_at),
        "updated_at": now,
    }


class Statements:
    """Every statement on one store's table.

    :param table: the table.
    :param upsert: the dialect's ``insert`` construct with ``ON CONFLICT``,
        or ``None`` for a dialect without it.
    :param dialect: the dialect's name.
    :param held: build the claims for a claim held inside the transaction
        of the handlers' writes (:class:`~flask_ploints.stores._session.SessionStore`):
        they write the row done, kept until ``keep_until``, since nobody
        sees it before it commits, and it commits only with the handlers'
        writes.
    """

    def __init__(
        self,
        table: sa.Table,
        upsert: t.Callable[[sa.Table], t.Any] | None,
        dialect: str,
        *,
        held: bool = False,
    ) -> None:
        c = table.c
        state, expires = (_DONE, _keep_until) if held else (_IN_FLIGHT, _lease_end)
        # What a claim reads back: ours when the token is, else who holds it.
        holder = (c.token, c.status, c.lease_expires, c.expires)
        self.holder: sa.Select[t.Any] = sa.select(*holder).where(c.id == _event_id)
        #: The holder read with a shared lock: the latest committed row
        #: whatever the transaction's snapshot, for a claim held in one.
        self.holder_locked: sa.Select[t.Any] = t.cast(
            "sa.Select[t.Any]", self.holder.with_for_update(read=True)
        )
        values = {
            "id": _event_id,
            "status": state,
            "token": _token,
            "lease_expires": _lease_end,
            "expires": expires,
            "attempts": _ONE,
            "error": sa.null(),
            "payload": _payload,
            "created_at": _now,
            "updated_at": _now,
        }
        #: ``INSERT ... ON CONFLICT DO NOTHING``: the claim of an id never
        #: seen, the common case. ``None`` without ON CONFLICT.
        self.insert_new: sa.Executable | None = None
        self.insert_held: sa.Executable | None = None
        #: ``INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE free RETURNING``
        #: the holder: our row when the claim took over the id, no row when
        #: it changed nothing. ``None`` without ON CONFLICT.
        self.upsert: sa.Executable | None = None
        #: PostgreSQL only: the upsert as a CTE, then the current holder
        #: when it returned nothing, in one statement. The second SELECT
        #: reads the statement's snapshot, so a row a concurrent claim
        #: inserted since may be missing: no row, and the claim goes round.
        self.claim: sa.Executable | None = None
        if upsert is not None:
            inserting: t.Any = upsert(table)
            if held and dialect == "postgresql":
                # The held claim's bound on waiting for a concurrent holder's
                # row, set (for the rest of the transaction) by the same
                # statement: the CTE runs before the insert takes its lock.
                wait = sa.func.set_config(
                    "lock_timeout", sa.bindparam("lock_wait", type_=sa.String()), True
                )
                bounded = sa.select(wait.label("lock_timeout")).cte("lock_wait")
                rows = sa.select(
                    *(t.cast(t.Any, value).label(name) for name, value in values.items())
                )
                inserting = inserting.from_select(list(values), rows.select_from(bounded))
            else:
                inserting = inserting.values(values)
            new_only: t.Any = inserting.on_conflict_do_nothing(index_elements=[c.id])
            self.insert_new = new_only
            if held:
                #: The held claim of an id never seen, the common case: ours
                #: when it returns a row.
                self.insert_held = new_only.returning(c.token)
            # EXCLUDED rather than the parameters again: each mention of a
            # parameter is one more for the driver to send.
            proposed = inserting.excluded
            free, take_over = _take_over(
                c,
                proposed.token,
                proposed.lease_expires,
                proposed.payload,
                proposed.updated_at,
                state,
                proposed.expires,
            )
            upserting: t.Any = inserting.on_conflict_do_update(
                index_elements=[c.id], set_=take_over, where=free
            ).returning(*holder)
            self.upsert = upserting
            if dialect == "postgresql":
                claimed = upserting.cte("claimed")
                self.claim = sa.union_all(
                    sa.select(*(claimed.c[column.name] for column in holder)),
                    self.holder.where(~sa.exists().select_from(claimed)),
                )
        #: Without ON CONFLICT: insert, and on a duplicate key take over.
        self.insert = sa.insert(table).values(values)
        free, take_over = _take_over(c, _token, _lease_end, _payload, _now, state, expires)
        self.take_over = sa.update(table).where(c.id == _event_id, free).values(take_over)

        owns = sa.and_(
            c.id == _event_id, c.token == _token, c.status == _IN_FLIGHT, c.lease_expires > _now
        )
        self.commit = (
            sa.update(table).where(owns).values(status=_DONE, expires=_keep_until, updated_at=_now)
        )
        self.release = sa.delete(table).where(owns)
        self.extend = (
            sa.update(table)
            .where(owns)
            .values(lease_expires=_lease_end, expires=_lease_end, updated_at=_now)
        )
        self.fail = (
            sa.update(table)
            .where(owns)
            .values(
                status=_FAILED,
                error=_error,
                expires=_keep_until,
                updated_at=_now,
                # A worker's count of its attempts, else the count of claims.
                attempts=sa.func.coalesce(sa.bindparam("attempts", type_=sa.Integer()), c.attempts),
            )
        )

        self.purge = sa.delete(table).where(
            sa.or_(
                sa.and_(c.status.in_([_DONE, _FAILED]), c.expires <= _now),
                sa.and_(
                    c.status == _IN_FLIGHT,
                    c.lease_expires <= sa.bindparam("abandoned_before", type_=sa.Double()),
                ),
            )
        )
        event = sa.select(c.id, c.status, c.attempts, c.error, c.payload, c.updated_at)
        live = sa.or_(
            sa.and_(c.status == _IN_FLIGHT, c.lease_expires > _now),
            sa.and_(c.status != _IN_FLIGHT, c.expires > _now),
        )
        self.get: sa.Select[t.Any] = event.where(c.id == _event_id, live)
        self.failed: sa.Select[t.Any] = (
            event.where(c.status == _FAILED, c.expires > _now)
            .order_by(c.updated_at.desc())
            .limit(sa.bindparam("limit", type_=sa.Integer()))
        )

    def all(self) -> dict[str, sa.Executable]:
        """Every statement the dialect has, by name."""
        return {
            name: statement
            for name, statement in vars(self).items()
            if isinstance(statement, sa.Executable)
        }


class Holder(t.NamedTuple):
    """Who holds an id: its row's token, state and times."""

    token: str
    status: EventState
    lease_expires: float
    expires: float


def holder(row: t.Any) -> Holder | None:
    """The :class:`Holder` of a row of :attr:`Statements.holder`, or ``None``."""
    if row is None:
        return None
    token, status, lease_expires, expires = row
    return Holder(token, EventState(status), lease_expires, expires)


def stored(row: t.Sequence[t.Any]) -> StoredEvent:
    """The event of a row of :attr:`Statements.get` or :attr:`Statements.failed`."""
    id, status, attempts, error, payload, updated_at = row
    return StoredEvent(
        id=id,
        status=EventState(status),
        attempts=attempts,
        error=error,
        payload=None if payload is None else bytes(payload),
        updated_at=updated_at,
    )
