"""The dedupe store in a SQL database: :class:`SQLAlchemyStore`."""

from __future__ import annotations

import os
import secrets
import threading
import time
import typing as t
import weakref

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError

from ..._ordering import Turn
from ..._ordering import TurnEnd
from ..._ordering import TurnStatus
from .._base import Claim
from .._base import ClaimStatus
from .._base import EventState
from .._base import StoredEvent
from .._base import StoreError
from .deadline import deadline
from .ordering import OrderStatements
from .ordering import make_order_table
from .statements import Holder
from .statements import Statements
from .statements import holder
from .statements import make_table
from .statements import stored
from .tables import ManagedTable
from .tables import engine_from_url
from .tables import ensure_table

__all__ = ["SQLAlchemyStore"]

_IN_FLIGHT = EventState.IN_FLIGHT
_DONE = EventState.DONE
_FAILED = EventState.FAILED
_CLAIMED_DONE = Claim(ClaimStatus.DONE)
# A claim goes round again when the row changes under it (released, purged,
# or inserted by a concurrent claim after the statement's snapshot); more
# than a few rounds means something is wrong.
_CLAIM_ROUNDS = 5
_T = t.TypeVar("_T")
#: The engines the stores built: a forked child leaves their pools, the
#: parent's connections, alone (``dispose(close=False)``).
_OWN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork() -> None:
    for engine in list(_OWN_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)


class _Compiled:
    """A statement compiled once for a dialect: its SQL, and how to turn
    the store's parameters into the driver's (their types' bind processors,
    in order for a positional paramstyle), from the public
    :meth:`~sqlalchemy.sql.compiler.SQLCompiler.construct_expanded_state`.
    """

    __slots__ = ("names", "order", "processors", "sql")

    def __init__(self, statement: sa.Executable, dialect: t.Any) -> None:
        compiled = t.cast(t.Any, statement).compile(dialect=dialect)
        state = compiled.construct_expanded_state(dict.fromkeys(compiled.params))
        self.sql: str = state.statement
        # Each parameter with its default: SQLite's OFFSET has one.
        self.names = tuple(compiled.params.items())
        self.order = None if state.positiontup is None else tuple(state.positiontup)
        self.processors = []
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if name in compiled.params and process is not None:
                self.processors.append((name, process))

    def parameters(self, params: t.Mapping[str, t.Any]) -> t.Any:
        values = {name: params.get(name, default) for name, default in self.names}
        for name, process in self.processors:
            values[name] = process(values[name])
        return values if self.order is None else tuple(values[name] for name in self.order)


class _Call:
    """One call's connection: each statement runs through
    :meth:`Connection.exec_driver_sql`, seen by the engine's events, under
    the statement deadline (see :mod:`.deadline`).
    """

    __slots__ = ("_compiled", "_timeout", "connection", "timed_out")

    def __init__(
        self, connection: Connection, compiled: dict[int, _Compiled], timeout: float | None
    ) -> None:
        self.connection = connection
        self._compiled = compiled
        self._timeout = timeout
        #: A statement ran past its deadline and its connection was cut.
        self.timed_out = False

    def execute(self, statement: sa.Executable, params: t.Mapping[str, t.Any]) -> t.Any:
        """The :class:`~sqlalchemy.engine.CursorResult` of ``statement``."""
        connection = self.connection
        query = self._compiled.get(id(statement))
        if query is None:
            query = self._compiled[id(statement)] = _Compiled(statement, connection.dialect)
        values = query.parameters(params)
        guard = deadline(connection.connection.dbapi_connection, self._timeout)
        try:
            return connection.exec_driver_sql(query.sql, values)
        except DBAPIError:
            if guard.fired:
                self.timed_out = True
                if not connection.invalidated:
                    connection.invalidate()
            raise
        finally:
            guard.release()

    def first(self, statement: sa.Executable, params: t.Mapping[str, t.Any]) -> t.Any:
        """The first row of ``statement``, or ``None``."""
        return self.execute(statement, params).first()


class SQLAlchemyStore:
    """Remembers event ids in one table of a SQL database, shared by every
    worker process and host; tested on PostgreSQL (psycopg 3) and SQLite.
    It implements :class:`.InspectableStore` and raises every database error
    as :class:`.StoreError`. :doc:`/sql-store` describes its table,
    statements, connections and clocks.

    :param engine: the engine to use; a Flask-SQLAlchemy ``db.engine`` can
        be shared. The store's calls check a connection out of its pool in
        autocommit mode (``isolation_level="AUTOCOMMIT"``), set back when
        it returns.
    :param table_name: the table to keep event ids in.
    :param keep_payloads: keep each event's raw body, for replay.
    :param create_table: create the table (if missing) on first use; else
        call :meth:`create_table` or create it with your migrations.
    :param clock: the time in seconds since the epoch, for every time the
        store writes or compares; default, :func:`time.time`.
    :param statement_timeout: the most seconds one statement may take on a
        network database before its connection is cut and the call raises
        :class:`.StoreError`; ``None`` for no bound. See :doc:`/sql-store`.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
        The ``clock`` and ``statement_timeout`` parameters.
    """

    #: Dialects that claim with ``INSERT ... ON CONFLICT``, with their
    #: ``insert`` construct; others insert, then update.
    _upserts: t.ClassVar[dict[str, t.Callable[[sa.Table], t.Any]]] = {
        "postgresql": postgresql.insert,
        "sqlite": sqlite.insert,
    }

    def __init__(
        self,
        engine: Engine,
        *,
        table_name: str = "ploints_events",
        keep_payloads: bool = True,
        create_table: bool = True,
        clock: t.Callable[[], float] = time.time,
        statement_timeout: float | None = 2.0,
    ) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        self.table = make_table(table_name, dialect)
        self.keep_payloads = keep_payloads
        self._clock = clock
        self._timeout = statement_timeout
        self._engine: Engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._compiled: dict[int, _Compiled] = {}
        self._sql = Statements(self.table, self._upserts.get(dialect), dialect)
        self._table = ManagedTable(
            engine, self.table, create=create_table, error=StoreError, wait=statement_timeout
        )
        #: ``latest_by``'s table: the table's name with ``_order``.
        self.order_table = make_order_table(f"{table_name}_order")
        self._order_sql = OrderStatements(self.order_table, dialect, self._sql)
        self._order_missing = create_table
        self._order_lock = threading.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 2.0,
        engine_options: t.Mapping[str, t.Any] | None = None,
        **kwargs: t.Any,
    ) -> SQLAlchemyStore:
        """Build a store with its own engine for ``url`` (see
        :func:`engine_from_url`), in ``AUTOCOMMIT`` mode, without pings,
        the connection given back last used first (``pool_use_lifo``). No
        connection is made until the first call; see :doc:`/sql-store`.

        :param url: a SQLAlchemy database URL.
        :param timeout: seconds to wait to connect, for a free connection of
            the pool, and (unless ``statement_timeout`` is given) for a
            statement; on SQLite, for another process's write lock.
        :param engine_options: more keyword arguments for
            :func:`sqlalchemy.create_engine`; they win over the above.
        :param kwargs: passed to the constructor (``table_name``,
            ``keep_payloads``, ``create_table``, ``clock``).
        """
        options: dict[str, t.Any] = {
            "pool_pre_ping": False,
            "isolation_level": "AUTOCOMMIT",
            **(engine_options or {}),
        }
        autocommit = options["isolation_level"] == "AUTOCOMMIT"
        if autocommit:
            # No transaction is ever left open to roll back on checkin.
            options.setdefault("pool_reset_on_return", None)
        if "poolclass" not in options and not url.startswith("sqlite"):
            options.setdefault("pool_use_lifo", True)
        kwargs.setdefault("statement_timeout", timeout)
        engine = engine_from_url(url, timeout=timeout, engine_options=options)
        store = cls(engine, **kwargs)
        if autocommit:
            # Every connection is in autocommit mode already.
            store._engine = engine
        _OWN_ENGINES.add(engine)
        return store

    def close(self) -> None:
        """Close the connections of the pool of a store made by
        :meth:`from_url` (:meth:`Engine.dispose`); a store given an engine
        leaves it alone. The store connects again if it is used after.
        """
        if self.engine in _OWN_ENGINES:
            self.engine.dispose()

    def create_table(self) -> None:
        """Create the table and its index unless they exist.

        :raises StoreError: the database refused.
        """
        self._table.create()

    def prepare(self) -> None:
        """Create the table now if the store creates it on first use and
        this is the first use.

        :raises StoreError: the database refused.

        .. versionadded:: 0.2
        """
        self._table.ready()

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. The payload is kept when
        ``keep_payloads`` is set; a new claim without one keeps the last.
        """
        return self._claim_as(secrets.token_hex(8), event_id, lease, payload)

    def _claim_as(
        self,
        token: str,
        event_id: str,
        lease: float,
        payload: bytes | None,
        inserted: bool = False,
    ) -> Claim:
        """Claim ``event_id`` with ``token``; ``inserted``: a statement of
        this claim already tried the insert of an id never seen.
        """
        params: dict[str, t.Any] = {
            "event_id": event_id,
            "claim_token": token,
            "body": payload if self.keep_payloads else None,
        }
        for _ in range(_CLAIM_ROUNDS):
            now = params["now"] = self._clock()
            params["lease_end"] = now + lease
            found = self._run(lambda call, _retry: self._claim(call, params, inserted))
            if found is None:
                # Released or purged between the statements: go round again.
                continue
            # Our token: the claim inserted or took over the row, now or in
            # a first run whose connection died before the answer came back.
            if found.token == token and found.status == _IN_FLIGHT:
                return Claim(ClaimStatus.CLAIMED, token)
            if found.status == _DONE and found.expires > now:
                return _CLAIMED_DONE
            if found.status == _IN_FLIGHT and found.lease_expires > now:
                return Claim(ClaimStatus.IN_FLIGHT, retry_after=found.lease_expires - now)
        raise StoreError(f"the claim of {event_id!r} kept racing with other requests")

    def _claim(self, call: _Call, params: dict[str, t.Any], inserted: bool) -> Holder | None:
        """Insert the row (unless ``inserted`` tried that already), or take
        it over when it is free; return the row's holder: ours when this
        claim owns it.
        """
        sql = self._sql
        ours = Holder(params["claim_token"], _IN_FLIGHT, params["lease_end"], 0.0)
        insert_new = None if inserted else sql.insert_new
        if insert_new is not None and call.execute(insert_new, params).rowcount == 1:
            return ours
        if sql.claim is not None:
            return holder(call.first(sql.claim, params))
        if sql.upsert is not None and self.engine.dialect.insert_returning:
            found = holder(call.first(sql.upsert, params))
            if found is not None:
                return found
        else:
            # In autocommit mode the failed INSERT leaves the connection usable.
            try:
                call.execute(sql.insert, params)
                return ours
            except IntegrityError:
                pass
            if call.execute(sql.take_over, params).rowcount == 1:
                return ours
        return holder(call.first(sql.holder, params))

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`."""
        return self._commit(self._sql.commit, event_id, token, retention, {})

    def _commit(
        self,
        statement: sa.Executable,
        event_id: str,
        token: str,
        retention: float,
        params: dict[str, t.Any],
    ) -> bool:
        now = self._clock()
        params.update(event_id=event_id, claim_token=token, now=now, keep_until=now + retention)
        return self._settle(
            statement,
            params,
            lambda found: found is not None and (found.token, found.status) == (token, _DONE),
        )

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`. The row is deleted."""
        return self._settle(
            self._sql.release,
            {"event_id": event_id, "claim_token": token, "now": self._clock()},
            lambda found: found is None,
        )

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`."""
        now = self._clock()
        # Run again after a first run that did extend, it matches again.
        return self._settle(
            self._sql.extend,
            {"event_id": event_id, "claim_token": token, "now": now, "lease_end": now + lease},
            None,
        )

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        """See :meth:`.DedupeStore.fail`. The row keeps the error for
        ``retention`` seconds.
        """
        now = self._clock()
        params = {
            "event_id": event_id,
            "claim_token": token,
            "now": now,
            "keep_until": now + retention,
            "reason": error,
            "attempts": attempts,
        }
        return self._settle(
            self._sql.fail,
            params,
            lambda found: found is not None and (found.token, found.status) == (token, _FAILED),
        )

    def _settle(
        self,
        statement: sa.Executable,
        params: dict[str, t.Any],
        done_before: t.Callable[[Holder | None], bool] | None,
    ) -> bool:
        """Run a conditional ``UPDATE`` or ``DELETE``: ``True`` when it matched.

        :param done_before: when the statement runs a second time (its first
            connection died) and matches nothing, whether the row shows that
            the first run did the work before the connection died.
        """

        def settle(call: _Call, retry: bool) -> bool:
            if call.execute(statement, params).rowcount == 1:
                return True
            if not retry or done_before is None:
                return False
            return done_before(holder(call.first(self._sql.holder, params)))

        return self._run(settle)

    def purge(self, now: float | None = None, *, in_flight_grace: float = 86400.0) -> int:
        """Delete the rows the store no longer needs, and return how many.

        Those are done and failed rows past their retention, and in-flight
        rows whose lease ended more than ``in_flight_grace`` seconds ago (their
        process died; the sender's next retry would claim them anew). Run it
        from a periodic job; the receiver never calls it.

        :param now: the time to purge as of, in seconds since the epoch;
            default, the store's clock.
        :param in_flight_grace: how long to keep an abandoned in-flight row,
            for inspection.
        """
        now = self._clock() if now is None else now
        params = {"now": now, "abandoned_before": now - in_flight_grace}
        count: int = self._run(lambda call, _retry: call.execute(self._sql.purge, params).rowcount)
        return count

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`."""
        params = {"event_id": event_id, "now": self._clock()}
        row = self._run(lambda call, _retry: call.first(self._sql.get, params))
        return None if row is None else stored(row)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`. Uses the table's index of
        failed rows.
        """
        params = {"now": self._clock(), "limit": max(limit, 0)}
        rows = self._run(lambda call, _retry: call.execute(self._sql.failed, params).all())
        return [stored(row) for row in rows]

    def _run(self, operation: t.Callable[[_Call, bool], _T]) -> _T:
        """Call ``operation(call, retry)`` on a connection of the pool; when
        it turns out dead, once more, with ``retry`` set: SQLAlchemy
        invalidated it and the pool's older ones, so the second run
        connects afresh. A failure to connect is not retried, so an
        unreachable database fails within one connect timeout; nor is a
        statement past its deadline, so a silent one fails within it.
        """
        with self._table.use():
            for retry in (False, True):
                call: _Call | None = None
                try:
                    with self._engine.connect() as connection:
                        call = _Call(connection, self._compiled, self._timeout)
                        return operation(call, retry)
                except DBAPIError as exc:
                    if retry or call is None or call.timed_out or not exc.connection_invalidated:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- latest_by (flask_ploints._ordering.OrderedStore)

    def prepare_order(self) -> None:
        """Create :attr:`order_table` unless it exists, on first use (unless
        the store was made with ``create_table=False``).

        :raises StoreError: the database refused.
        """
        if not self._order_missing:
            return
        with self._order_lock:
            if self._order_missing:
                with self._table.use():
                    ensure_table(self.engine, self.order_table)
                self._order_missing = False

    def order_begin(self, key: str, timestamp: int, lease: float) -> Turn:
        """See :meth:`.OrderedStore.order_begin`: one ``UPDATE`` when the
        turn is free, in the table named after the store's with ``_order``.
        """
        self.prepare_order()
        return self._take_turn(secrets.token_hex(8), key, timestamp, lease)

    def _take_turn(self, token: str, key: str, timestamp: int, lease: float) -> Turn:
        sql = self._order_sql
        params: dict[str, t.Any] = {"ordered": key, "turn_token": token, "stamp": timestamp}

        def begin(call: _Call, _retry: bool) -> t.Any:
            if call.execute(sql.take, params).rowcount == 1:
                return None
            row = call.first(sql.read, params)
            if row is None:
                call.execute(sql.insert, params)
                if call.execute(sql.take, params).rowcount == 1:
                    return None
                row = call.first(sql.read, params)
            return row

        for _ in range(_CLAIM_ROUNDS):
            now = params["now"] = self._clock()
            params["turn_end"] = now + lease
            row = self._run(begin)
            turn = (
                Turn(TurnStatus.RUN, token) if row is None else _judge(row, token, timestamp, now)
            )
            if turn is not None:
                return turn
        raise StoreError(f"the turn on {key!r} kept racing with other requests")

    def order_end(self, key: str, token: str, timestamp: int | None, retention: float) -> bool:
        """See :meth:`.OrderedStore.order_end`. One ``UPDATE``."""
        now = self._clock()
        params: dict[str, t.Any] = {"ordered": key, "turn_token": token}
        if timestamp is None:
            statement = self._order_sql.end_failed
        else:
            statement = self._order_sql.end_applied
            params.update(stamp=timestamp, now=now, keep_until=now + retention)
        return self._settle(statement, params, None)

    def claim_with_turns(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        keys: t.Sequence[str],
        timestamp: int,
    ) -> tuple[Claim, list[Turn]]:
        """See :meth:`.TurnsWithClaims.claim_with_turns`. On PostgreSQL, the
        claim of an id never seen takes its turns in the same statement;
        otherwise, or when that statement did not take every turn (a
        duplicate, a stale event, a busy key), the claim is :meth:`claim`'s,
        then each turn :meth:`order_begin`'s, with the claim's token.
        """
        self.prepare_order()
        token = secrets.token_hex(8)
        folded = self._order_sql.claim_with_turns.get(min(len(keys), 2))
        if folded is not None:
            now = self._clock()
            params: dict[str, t.Any] = {
                "event_id": event_id,
                "claim_token": token,
                "body": payload if self.keep_payloads else None,
                "now": now,
                "lease_end": now + lease,
                "stamp": timestamp,
            }
            if len(keys) == 1:
                params["key"] = keys[0]
            else:
                params["keys"] = list(keys)
            taken = self._run(lambda call, _retry: call.execute(folded, params).rowcount)
            if taken == len(keys):
                return Claim(ClaimStatus.CLAIMED, token), [Turn(TurnStatus.RUN, token)] * taken
        # Our token again where the statement claimed, or a first one whose
        # answer was lost did; each turn it took is found ours.
        claim = self._claim_as(token, event_id, lease, payload, inserted=folded is not None)
        if claim.status is not ClaimStatus.CLAIMED:
            return claim, []
        return claim, [self._take_turn(token, key, timestamp, lease) for key in keys]

    def commit_with_turns(
        self, event_id: str, token: str, retention: float, ends: t.Sequence[TurnEnd]
    ) -> bool:
        """See :meth:`.TurnsWithClaims.commit_with_turns`. On PostgreSQL, one
        statement; otherwise :meth:`commit`, then :meth:`order_end` for each
        turn.
        """
        folded = self._order_sql.commit_with_turns.get(min(len(ends), 2))
        if folded is not None:
            params: dict[str, t.Any]
            if len(ends) == 1:
                [(key, turn, stamp)] = ends
                params = {"end_key": key, "end_token": turn, "end_stamp": stamp}
            else:
                keys, tokens, stamps = (list(column) for column in zip(*ends, strict=True))
                params = {"end_keys": keys, "end_tokens": tokens, "end_stamps": stamps}
            return self._commit(folded, event_id, token, retention, params)
        committed = self._commit(self._sql.commit, event_id, token, retention, {})
        for key, turn_token, stamp in ends:
            self.order_end(key, turn_token, stamp, retention)
        return committed


def _judge(row: t.Sequence[t.Any], token: str, timestamp: int, now: float) -> Turn | None:
    """The turn told by a key's row (see :attr:`OrderStatements.read`) when
    it could not be taken; ``None`` when the row does not say, or is
    missing: ask again.
    """
    newest, expires, holder, turn_ends = row
    # Ours: taken by the claim's statement beside a turn it could not take,
    # or by a first run whose answer was lost.
    if holder == token:
        return Turn(TurnStatus.RUN, token)
    if holder and turn_ends > now:
        return Turn(TurnStatus.BUSY, retry_after=turn_ends - now)
    if newest is not None and expires > now and timestamp < newest:
        return Turn(TurnStatus.STALE, newest=int(newest))
    return None
