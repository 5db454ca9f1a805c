"""The dedupe store in the app's own database, in the transaction of the
handlers' writes: :class:`SessionStore`.

A delivery's claim is an ``INSERT`` of the event's row, marked done, in the
transaction of the session the handlers write through; committing that
transaction commits the handlers' writes and the row together, and a handler
failure rolls both back. A concurrent delivery of the same id waits on the
row's lock (a bounded time) and then sees it done, or claims it when the
first rolled back. What the store does when, and what it guarantees, is in
:doc:`/guarantees`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import time
import typing as t
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from .._errors import HandlerError
from .._ordering import KeyBusy
from .._ordering import Turn
from .._ordering import TurnEnd
from .._ordering import TurnStatus
from ._base import Claim
from ._base import ClaimStatus
from ._base import EventState
from ._base import StoredEvent
from ._base import StoreError
from ._sql.deadline import Guard
from ._sql.deadline import bound_connects
from ._sql.deadline import deadline
from ._sql.locks import bounded_lock_wait
from ._sql.locks import hold_row
from ._sql.locks import is_lock_wait
from ._sql.statements import Holder
from ._sql.statements import Statements
from ._sql.store import SQLAlchemyStore
from ._sql.tables import database_error
from ._sql.tables import driver_exception

if t.TYPE_CHECKING:
    from .._events import Event

__all__ = ["SessionStore", "current_session"]

# The tokens of a turn held by the transaction's row lock, whose advance is
# still to write or written already.
_LOCKED = "\x00locked"
_ADVANCED = "\x00advanced"
_UPSERTS: dict[str, t.Callable[[sa.Table], t.Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


@dataclass
class _Held:
    """The claim this context holds inside its session's transaction."""

    token: str
    session: Session
    #: The connection's transaction the claim was written in.
    root: sa.RootTransaction | None
    #: The DBAPI connection of the transaction, for the bounds of the
    #: store's statements on it.
    dbapi: object
    guard: Guard
    #: The claim was the worker's durable claim, taken over in the
    #: transaction: settling it outside the transaction goes to its row.
    adopted: bool
    #: The payload the claim keeps, for the failure recorded outside the
    #: transaction once the claim is rolled back.
    payload: bytes | None
    #: Seconds the claim is retained once committed, and so the newest
    #: timestamp a latest_by handler applies in the transaction.
    retention: float


_held: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("ploints_held", default=None)
# The session of the handlers running now; unset between events, also while
# a failed worker attempt's claim waits for its retry.
_handling: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "ploints_handling", default=None
)


def current_session() -> Session:
    """Return the SQLAlchemy session the current event's handlers write
    through, with a :class:`SessionStore`: what ``db.session`` is with
    Flask-SQLAlchemy, the session the store opened with a ``sessionmaker``.

    :raises RuntimeError: called outside a handler run with a
        :class:`SessionStore`.
    """
    session = _handling.get()
    if session is None:
        raise RuntimeError(
            "current_session() works in the handlers of an event whose dedupe store is a"
            " SessionStore (PLOINTS_DEDUPE_STORE = db)"
        )
    return session


class SessionStore:
    """Keeps event ids in the app's own database, in the transaction of the
    session its handlers write through, so that an event's writes and its
    dedupe record commit together: exactly once. Set
    ``PLOINTS_DEDUPE_STORE`` to a Flask-SQLAlchemy ``db``, a
    :class:`~sqlalchemy.orm.scoped_session` or a
    :class:`~sqlalchemy.orm.sessionmaker` to get one. Tested on
    PostgreSQL, SQLite and MariaDB.

    Handlers write through the session and do not commit: the store commits
    after the last handler, and rolls back when one raises. A handler that
    commits or rolls back the session fails the event (see
    :doc:`/guarantees`). The table is the one of :class:`.SQLAlchemyStore`,
    in the session's default database; everything outside the handlers'
    transaction (a worker's claim, a failure's record, inspection, purge)
    goes through a :class:`.SQLAlchemyStore` on the session's engine.

    :param session: the session the handlers write through; a
        ``sessionmaker`` is wrapped in a :class:`~sqlalchemy.orm.scoped_session`
        whose session is removed after each event, and handlers reach it
        with :func:`current_session`.
    :param table_name: the table to keep event ids in.
    :param lock_timeout: the most seconds a delivery waits for the row of
        a concurrent delivery of the same id; past it, the id is in flight.
        On PostgreSQL it bounds every lock wait of the transaction.
    :param transaction_timeout: the most seconds a held claim's
        transaction may stay open before its connection is cut, which rolls
        it back and frees its locks; ``None`` for no bound. A worker's run of
        a queued event may stay open for its lease instead, when longer.
        PostgreSQL and MariaDB/MySQL (a connection with a socket).
    :param statement_timeout: the most seconds each of the store's own
        statements may take (the claim may wait ``lock_timeout`` more for a
        row lock) before its connection is cut and the call raises
        :class:`.StoreError`; also the connect timeout of the session's
        engine when the app gave none. ``None`` for no bound. See
        :doc:`/sql-store`.
    :param clock: the time in seconds since the epoch.

    .. versionchanged:: 0.2
        The ``statement_timeout`` parameter.
    """

    def __init__(
        self,
        session: scoped_session[t.Any] | sessionmaker[t.Any],
        *,
        table_name: str = "ploints_events",
        lock_timeout: float = 2.0,
        transaction_timeout: float | None = 8.0,
        statement_timeout: float | None = 2.0,
        clock: t.Callable[[], float] = time.time,
    ) -> None:
        self._owns_sessions = isinstance(session, sessionmaker)
        self.session: scoped_session[t.Any] = (
            scoped_session(session) if isinstance(session, sessionmaker) else session
        )
        self.table_name = table_name
        self.lock_timeout = lock_timeout
        self.transaction_timeout = transaction_timeout
        self.statement_timeout = statement_timeout
        self._clock = clock
        self._outside: SQLAlchemyStore | None = None
        self._statements: Statements | None = None
        self._hold_with_turn: t.Any = None

    def _store(self) -> SQLAlchemyStore:
        """The store for what goes on outside the handlers' transaction, on
        the session's engine, made on first use (Flask-SQLAlchemy knows its
        engine only in an app context).
        """
        if self._outside is None:
            engine = self.session.get_bind()
            if not isinstance(engine, sa.Engine):
                engine = engine.engine
            store = SQLAlchemyStore(
                engine,
                table_name=self.table_name,
                clock=self._clock,
                statement_timeout=self.statement_timeout,
            )
            if self.statement_timeout is not None:
                bound_connects(engine, self.statement_timeout)
            name = engine.dialect.name
            self._statements = Statements(store.table, _UPSERTS.get(name), name, held=True)
            self._hold_with_turn = store._order_sql.hold_with_turn(self._statements)
            self._outside = store
        return self._outside

    # -- the claim held in the handlers' transaction

    def hold(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        retention: float,
        token: str | None = None,
    ) -> Claim:
        """Claim ``event_id`` inside the session's transaction, marked done
        until ``retention`` seconds from now: nobody sees the claim until
        :meth:`commit` commits it with the handlers' writes. With ``token``,
        take over that claim of a worker, or claim the id again when it
        lapsed; the transaction is then bounded by ``lease`` rather than
        :attr:`transaction_timeout`, when longer.

        :raises StoreError: the database failed.
        """
        return self._hold(event_id, lease, payload, retention, token, None)[0]

    def hold_with_turns(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        retention: float,
        keys: t.Sequence[str],
        timestamp: int,
    ) -> tuple[Claim, list[Turn]]:
        """:meth:`hold` ``event_id`` and, when it is claimed, take the turn
        of each of ``keys`` as :meth:`order_begin` does, in the same
        transaction: on PostgreSQL, the claim of an id never seen and the
        turn of one key are one statement. Where they are not, no turn is
        taken, and each guard takes its own with :meth:`order_begin`.

        :return: the claim, and the turn of each key taken, in order.
        :raises StoreError: the database failed.
        """
        turn = (keys[0], timestamp) if len(keys) == 1 else None
        return self._hold(event_id, lease, payload, retention, None, turn)

    def _hold(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        retention: float,
        token: str | None,
        turn: tuple[str, int] | None,
    ) -> tuple[Claim, list[Turn]]:
        store = self._store()
        store.prepare()
        folded = self._hold_with_turn if turn is not None else None
        if folded is not None:
            store.prepare_order()
        session = self.session()
        params: dict[str, t.Any] = {
            "event_id": event_id,
            "claim_token": token or secrets.token_hex(8),
            "body": payload if store.keep_payloads else None,
            "lock_wait": f"{int(self.lock_timeout * 1000)}ms",
        }
        turns: list[Turn] = []
        try:
            connection = session.connection()
            dbapi = connection.connection.dbapi_connection
            # The lock wait is bounded by the database; this, the rest.
            statements = self.statement_timeout
            bound = deadline(dbapi, None if statements is None else self.lock_timeout + statements)
            try:
                found = None
                if folded is not None and turn is not None:
                    now = params["now"] = self._clock()
                    params.update(lease_end=now + lease, keep_until=now + retention)
                    params.update(ordered=turn[0], stamp=turn[1])
                    row = connection.execute(folded, params).first()
                    if row is not None:
                        found = Holder(row.token, EventState.DONE, 0.0, 0.0)
                        turns.append(_judged(turn[1], row.newest, _ADVANCED))
                if found is None:
                    times = (lease, retention, self._clock, self.lock_timeout)
                    found = hold_row(
                        connection, self._statements, params, *times, token is not None
                    )
            finally:
                bound.release()
        except SQLAlchemyError as exc:
            self._abandon(session)
            if is_lock_wait(exc):
                # Another transaction holds the id's row or, with a folded
                # turn, maybe the key's: a delivery for the key, which the
                # retry should not meet again at once.
                wait = self.lock_timeout if folded is not None else 0.0
                return Claim(ClaimStatus.IN_FLIGHT, retry_after=wait), []
            raise database_error(exc, StoreError) from driver_exception(exc)
        now = params["now"]
        if found is None:
            self._abandon(session)
            raise StoreError(f"the claim of {event_id!r} kept racing with other requests")
        if found.token == params["claim_token"]:
            limit = self.transaction_timeout
            if token is not None and limit is not None:
                # A worker's run: no sender waits on it, and it is slow work
                # moved off the request. Its transaction may last as long
                # as the claim it holds.
                limit = max(limit, lease)
            guard = deadline(dbapi, limit)
            # A claim of its own when the worker's had lapsed: not durable.
            adopted = token is not None and found.token == token
            root = connection.get_transaction()
            _held.set(
                _Held(
                    found.token,
                    session,
                    root,
                    dbapi,
                    guard,
                    adopted,
                    payload=params["body"],
                    retention=retention,
                )
            )
            return Claim(ClaimStatus.CLAIMED, found.token), turns
        self._abandon(session)
        if found.status is EventState.DONE and found.expires > now:
            return Claim(ClaimStatus.DONE), []
        return Claim(ClaimStatus.IN_FLIGHT, retry_after=max(found.lease_expires - now, 0.0)), []

    @contextlib.contextmanager
    def handler_scope(self, event: Event) -> t.Iterator[None]:
        """Run the handlers in the held claim's transaction. A handler that
        raised rolls it back; one that committed or rolled back the session
        or its connection itself fails the event, since its writes went
        without the rest, and so does one that left the transaction unusable
        (it caught a database error): a handler's failure, not the store's.
        A ``COMMIT`` statement goes unseen: the store commits the rest.
        """
        held = _held.get()
        if held is None:
            yield
            return
        transaction = held.session.get_transaction()
        handling = _handling.set(held.session)
        try:
            yield
        except BaseException:
            # Settled later; a worker keeps its durable claim for a retry.
            self._abandon(held.session)
            held.guard.release()
            raise
        finally:
            _handling.reset(handling)
        root = held.root
        current = held.session.get_transaction()
        if current is transaction and transaction is not None and not transaction.is_active:
            problem = (
                "left the session's transaction unusable: it caught a database error (roll"
                " back to a savepoint, session.begin_nested(), to go on after one)"
            )
        elif current is not transaction or (
            root is not None
            and (not root.is_active or root.connection.get_transaction() is not root)
        ):
            problem = "committed or rolled back the session (or its connection)"
        else:
            return
        self._roll_back(held)
        raise HandlerError(
            f"a handler of event {event.id!r} {problem}; with PLOINTS_DEDUPE_STORE = db,"
            " handlers write and flask-ploints commits"
        )

    def _abandon(self, session: Session) -> None:
        # A failing rollback: the connection is gone, its transaction with it.
        with contextlib.suppress(SQLAlchemyError):
            session.rollback()

    def _roll_back(self, held: _Held) -> None:
        with deadline(held.dbapi, self.statement_timeout):
            self._abandon(held.session)

    def _take(self, token: str) -> _Held | None:
        held = _held.get()
        if held is None or held.token != token:
            return None
        _held.set(None)
        held.guard.release()
        return held

    def _close(self, held: _Held) -> None:
        if self._owns_sessions:
            self.session.remove()

    # -- the DedupeStore protocol

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`: a durable claim, committed at
        once outside the session, for a worker to take over.
        """
        return self._store().claim(event_id, lease, payload)

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """Commit the held claim with the handlers' writes; see
        :meth:`.DedupeStore.commit`.

        :raises StoreError: the commit failed: nothing was committed, unless
            the database committed and the answer was lost.
        """
        held = self._take(token)
        if held is None:
            return self._store().commit(event_id, token, retention)
        bound = deadline(held.dbapi, self.statement_timeout)
        try:
            held.session.commit()
        except SQLAlchemyError as exc:
            self._abandon(held.session)
            raise database_error(exc, StoreError) from driver_exception(exc)
        finally:
            bound.release()
            self._close(held)
        return True

    def commit_with_turns(
        self, event_id: str, token: str, retention: float, ends: t.Sequence[TurnEnd]
    ) -> bool:
        """:meth:`order_end` each of ``ends``, then :meth:`commit`: a turn
        taken in the held claim's transaction writes its advance in it, if
        it has not yet, and commits with it. A failed write rolls the
        transaction back.

        :raises StoreError: the database failed.
        """
        try:
            for key, turn, stamp in ends:
                self.order_end(key, turn, stamp, retention)
        except BaseException:
            self.release(event_id, token)
            raise
        return self.commit(event_id, token, retention)

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`: a held claim is rolled back with
        the handlers' writes.
        """
        held = self._take(token)
        if held is None:
            return self._store().release(event_id, token)
        self._roll_back(held)
        self._close(held)
        return self._store().release(event_id, token) if held.adopted else True

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`."""
        return self._store().extend(event_id, token, lease)

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        """See :meth:`.DedupeStore.fail`: a held claim is rolled back with
        the handlers' writes, then the event recorded failed outside it.
        """
        held = self._take(token)
        if held is not None:
            self._roll_back(held)
            self._close(held)
            if not held.adopted:
                claim = self._store().claim(event_id, 60.0, held.payload)
                if claim.status is not ClaimStatus.CLAIMED:
                    return False
                token = claim.token
        return self._store().fail(event_id, token, error, retention, attempts)

    # -- InspectableStore and purge

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`."""
        return self._store().get(event_id)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`."""
        return self._store().failed(limit)

    def purge(self, now: float | None = None, *, in_flight_grace: float = 86400.0) -> int:
        """See :meth:`.SQLAlchemyStore.purge`."""
        return self._store().purge(now, in_flight_grace=in_flight_grace)

    # -- latest_by (flask_ploints._ordering.OrderedStore)

    def order_begin(self, key: str, timestamp: int, lease: float) -> Turn:
        """See :meth:`.OrderedStore.order_begin`. In a held claim's
        transaction, the turn is the key's row locked until the transaction
        ends, and the newest applied is written in it, so that it commits or
        rolls back with the handlers' writes: on PostgreSQL and SQLite one
        ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` that locks the
        row and advances it unless the event is stale; elsewhere a ``SELECT
        ... FOR UPDATE`` now and an ``UPDATE`` at :meth:`order_end`. A lock
        wait past :attr:`lock_timeout` raises
        :class:`~flask_ploints._ordering.KeyBusy`. Outside one, as
        :meth:`.SQLAlchemyStore.order_begin`.
        """
        store = self._store()
        held = _held.get()
        if held is None:
            return store.order_begin(key, timestamp, lease)
        sql = store._order_sql
        now = self._clock()
        params: dict[str, t.Any] = {
            "ordered": key,
            "stamp": timestamp,
            "now": now,
            "keep_until": now + held.retention,
        }
        try:
            connection = held.session.connection()
            if connection.dialect.name == "sqlite":
                # Its transaction holds the database's write lock: another
                # connection could not create the table now.
                sql.table.create(connection, checkfirst=True)
            else:
                store.prepare_order()
            with bounded_lock_wait(connection, self.lock_timeout):
                if sql.lock_and_advance is not None and connection.dialect.insert_returning:
                    newest = connection.execute(sql.lock_and_advance, params).scalar_one()
                    token = _ADVANCED
                else:
                    newest = self._lock_order_row(connection, sql, params)
                    token = _LOCKED
        except SQLAlchemyError as exc:
            if is_lock_wait(exc):
                raise KeyBusy(key, self.lock_timeout) from None
            raise database_error(exc, StoreError) from driver_exception(exc)
        return _judged(timestamp, newest, token)

    @staticmethod
    def _lock_order_row(connection: sa.Connection, sql: t.Any, params: dict[str, t.Any]) -> t.Any:
        """Lock the key's row, inserting it first; the newest it remembers."""
        row = connection.execute(sql.lock, params).first()
        if row is None:
            connection.execute(sql.insert, params)
            row = connection.execute(sql.lock, params).first()
        if row is None or row.expires <= params["now"]:
            return None
        return row.newest

    def order_end(self, key: str, token: str, timestamp: int | None, retention: float) -> bool:
        """See :meth:`.OrderedStore.order_end`. A turn of the held claim's
        transaction writes in it, if :meth:`order_begin` did not, and
        commits with it.
        """
        if token not in (_LOCKED, _ADVANCED):
            return self._store().order_end(key, token, timestamp, retention)
        held = _held.get()
        if held is None or timestamp is None or token == _ADVANCED:
            # Written already, or the handler raised: the transaction rolls
            # back.
            return held is not None
        now = self._clock()
        params = {"ordered": key, "stamp": timestamp, "now": now, "keep_until": now + retention}
        try:
            held.session.connection().execute(self._store()._order_sql.advance, params)
        except SQLAlchemyError as exc:
            raise database_error(exc, StoreError) from driver_exception(exc)
        return True


def _judged(timestamp: int, newest: int | None, token: str) -> Turn:
    """The turn of an event at ``timestamp`` on a key locked in the
    transaction, whose newest applied is ``newest``.
    """
    if newest is not None and timestamp < newest:
        return Turn(TurnStatus.STALE, newest=newest)
    return Turn(TurnStatus.RUN, token)
