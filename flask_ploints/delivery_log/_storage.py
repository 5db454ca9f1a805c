"""The delivery log: one row per delivery outcome, for the delivery log page.

A :class:`DeliveryLog` listens to the lifecycle signals of one app and writes
a row for each outcome (see ``OUTCOMES``). Rows of verified
events keep the raw body, so that a failed event can be run again from the
page; a rejected request's body is never stored: it is unverified.

Needs SQLAlchemy 2: ``pip install "flask-ploints[sqlalchemy]"``.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import threading
import time
import typing as t

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Engine

from .._errors import DeliveryLogError
from ..stores._sql.deadline import deadline
from ..stores._sql.tables import ManagedTable
from ..stores._sql.tables import engine_from_url
from ._query import Filters
from ._query import distinct
from ._query import histogram
from ._query import select_rows
from ._query import where
from ._recording import Safely
from ._recording import connect_signals
from ._table import MAX_CLIENT
from ._table import MAX_REASON
from ._table import MAX_TRACEBACK
from ._table import OUTCOMES
from ._table import Delivery
from ._table import check_columns
from ._table import delivery
from ._table import make_table
from ._table import search_index
from ._table import search_text

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .._events import Event

__all__ = ["OUTCOMES", "Delivery", "DeliveryLog", "DeliveryLogError"]


# A purge runs from record() at most this often, so that rows past the
# retention go without a periodic job and a busy endpoint does not pay for a
# DELETE on every delivery.
_PURGE_INTERVAL = 600.0


class DeliveryLog:
    """Records every delivery outcome of an app in one table of a SQL
    database (SQLite, PostgreSQL and MariaDB are tested), and reads them back for the
    delivery log page.

    .. code-block:: python

        log = DeliveryLog.from_url("postgresql://db/app")
        log.connect(app)
        log.recent(20, outcome="failed")

    Writing is part of answering a delivery: each row is one ``INSERT`` in
    the request, bounded by ``timeout``. A write that fails is logged and
    dropped, and the log then skips its rows for 30 seconds (``PAUSE``), so
    the log can never change what the endpoint answers, nor hold it for
    longer than one timeout.

    :param engine: the engine to use, or a function that returns it, called
        once on first use: ``lambda: db.engine`` shares a Flask-SQLAlchemy
        ``db``'s engine, which it knows only in an app context.
    :param table_name: the table to keep deliveries in.
    :param retention: seconds a row is kept; :meth:`record` purges older
        rows at most every ten minutes. ``None`` keeps them until
        :meth:`purge` is called.
    :param create_table: create the table and its indexes (unless they
        exist) on first use; else call :meth:`create_table` or create it
        with your migrations. Either way, a table that lacks a column is
        refused on first use with a :exc:`DeliveryLogError` that gives the
        ``ALTER TABLE`` statements that add it.
    :param timeout: the most seconds one use of the database may take on a
        network database before its connection is cut; ``None`` for no
        bound.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        engine: Engine | t.Callable[[], Engine],
        *,
        table_name: str = "ploints_deliveries",
        retention: float | None = 7 * 86400.0,
        create_table: bool = True,
        timeout: float | None = 1.0,
    ) -> None:
        if retention is not None and retention <= 0:
            raise ValueError(f"retention must be positive seconds or None, not {retention!r}")
        self.table = make_table(table_name)
        self.retention = retention
        self.timeout = timeout
        self._next_purge = 0.0
        self._engine = engine
        self._managed: ManagedTable | None = None
        self._creates = create_table
        self._checked = False
        self._check_lock = threading.Lock()
        self._engine_lock = threading.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 2.0,
        engine_options: t.Mapping[str, t.Any] | None = None,
        **kwargs: t.Any,
    ) -> DeliveryLog:
        """Build a log with its own engine for ``url``, made as
        :meth:`.SQLAlchemyStore.from_url` makes one (see
        :func:`~flask_ploints.stores._sql.engine_from_url`). No connection is
        made until the first call.

        :param url: a SQLAlchemy database URL.
        :param timeout: seconds to wait to connect, and for each use of the
            database.
        :param engine_options: more keyword arguments for
            :func:`sqlalchemy.create_engine`.
        :param kwargs: passed to the constructor (``table_name``,
            ``retention``, ``create_table``).
        """
        # No ping before each use: a ping of a database that stopped
        # answering would wait outside the use's deadline.
        options = {"pool_pre_ping": False, **(engine_options or {})}
        engine = engine_from_url(url, timeout=timeout, engine_options=options)
        return cls(engine, timeout=timeout, **kwargs)

    @property
    def engine(self) -> Engine:
        """The log's engine; one given as a function is asked on first use."""
        return self._table.engine

    @property
    def _table(self) -> ManagedTable:
        managed = self._managed
        if managed is None:
            with self._engine_lock:
                managed = self._managed
                if managed is None:
                    engine = self._engine if isinstance(self._engine, Engine) else self._engine()
                    managed = ManagedTable(
                        engine,
                        self.table,
                        create=self._creates,
                        error=DeliveryLogError,
                        wait=self.timeout,
                    )
                    self._managed = managed
        return managed

    def create_table(self) -> None:
        """Create the table and its indexes unless they exist.

        :raises DeliveryLogError: the database refused, or the table lacks a
            column.
        """
        self._table.create()
        with self._check_lock:
            self._check(create=True)

    def connect(self, app: Flask) -> None:
        """Record the deliveries of ``app``, of every
        :class:`~flask_ploints.PlointsWebhooks` instance on it (rows carry
        the instance's name), by connecting to the lifecycle signals for
        this app only.
        """
        connect_signals(app, Safely(self.record))

    def record(
        self,
        outcome: str,
        *,
        name: str,
        event: Event | None = None,
        reason: str | None = None,
        traceback: str | None = None,
        duration: float | None = None,
        received_at: float | None = None,
        account: str | None = None,
        status: int | None = None,
        client: str | None = None,
    ) -> int:
        """Write one row and return its id. The lifecycle signals call it
        once :meth:`connect` has run; call it yourself for deliveries made
        some other way.

        :param outcome: one of :data:`OUTCOMES`.
        :param name: the instance that answered.
        :param event: the verified event, whose id, type and raw body are
            kept; ``None`` for a rejected request.
        :param reason: why it was rejected or failed; cut to
            :data:`MAX_REASON` characters.
        :param traceback: the handler's traceback; its last
            :data:`MAX_TRACEBACK` characters are kept.
        :param duration: seconds spent in the handlers.
        :param received_at: when the delivery arrived; default, now.
        :param account: the account of a rejected request; a verified
            event's is its own :attr:`~flask_ploints.Event.account`.
        :param status: the status a rejected request was answered.
        :param client: the address a rejected request came from.
        :raises ValueError: an unknown outcome, or a rejected row with an
            event.
        :raises DeliveryLogError: the database refused.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; known: {', '.join(OUTCOMES)}")
        if outcome == "rejected" and event is not None:
            raise ValueError("a rejected delivery is unverified: record its reason, not its body")
        self._prepare()
        now = time.time()
        values = {
            "received_at": now if received_at is None else received_at,
            "name": name,
            "event_id": None if event is None else event.id,
            "event_type": None if event is None else event.type,
            "outcome": outcome,
            "reason": None if reason is None else reason[:MAX_REASON],
            "payload": None if event is None else event.raw,
            "traceback": None if traceback is None else traceback[-MAX_TRACEBACK:],
            "duration": duration,
            "account": account if event is None else event.account,
            "status": status,
            "client": None if client is None else client[:MAX_CLIENT],
            "search": None if event is None else search_text(event.id, event.raw),
        }
        with self._begin() as conn:
            result = conn.execute(sa.insert(self.table).values(values))
            key = result.inserted_primary_key
        if self.retention is not None and now >= self._next_purge:
            self._next_purge = now + _PURGE_INTERVAL
            self.purge(self.retention, now=now)
        return int(key[0]) if key is not None else 0

    def recent(
        self,
        limit: int = 100,
        event_type: str | None = None,
        outcome: str | None = None,
        *,
        event_id: str | None = None,
        before: int | None = None,
        outcomes: t.Collection[str] | None = None,
        account: str | None = None,
        accounts: t.Collection[str] | None = None,
        q: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Delivery]:
        """Return up to ``limit`` deliveries, newest first.

        :param event_type: only this event type.
        :param outcome: only this outcome.
        :param event_id: only the deliveries of this event.
        :param before: only rows whose id is smaller, to page back.
        :param outcomes: only these outcomes.
        :param account: only the deliveries to this account.
        :param accounts: only the deliveries to these accounts (none for an
            empty collection).
        :param q: only those whose event id or a payload value holds this
            text, compared case-insensitively.
        :param since: only those received at or after, in epoch seconds.
        :param until: only those received before.
        :raises DeliveryLogError: the database refused.
        """
        if any("\x00" in text for text in (event_type, event_id, account) if text is not None):
            # No row holds one (events with control characters are refused),
            # and PostgreSQL refuses it in text rather than match nothing.
            return []
        self._prepare()
        filters = Filters(
            event_type, outcome, outcomes, event_id, before, account, accounts, q, since, until
        )
        statement = select_rows(self.table, filters, limit)
        with self._begin() as conn:
            rows = [] if statement is None else conn.execute(statement).all()
        wanted = filters.wanted()
        # Compared again, exactly: a case-insensitive collation matches "ACME"
        # for "acme", and scoping admits only the accounts it names.
        return [delivery(row) for row in rows if wanted is None or row.account in wanted]

    def _histogram(
        self, filters: Filters, start: float, width: float, buckets: int
    ) -> dict[str, list[int]]:
        """The chart's counts, as ``histogram`` counts them."""
        with self._begin() as conn:
            return histogram(conn, self.table, filters, start, width, buckets)

    def count(self, outcome: str, *, since: float) -> int:
        """Return how many rows of ``outcome`` were received since
        ``since`` (seconds since the epoch).

        :raises DeliveryLogError: the database refused.
        """
        conditions = where(self.table, Filters(outcome=outcome, since=since))
        statement = sa.select(sa.func.count()).select_from(self.table).where(*conditions or [])
        with self._begin() as conn:
            return int(conn.execute(statement).scalar_one())

    def get(self, delivery_id: int) -> Delivery | None:
        """Return one delivery, or ``None`` if there is no such row (or it
        was purged).

        :raises DeliveryLogError: the database refused.
        """
        statement = sa.select(self.table).where(self.table.c.id == delivery_id)
        with self._begin() as conn:
            row = conn.execute(statement).first()
        return None if row is None else delivery(row)

    def event_types(self, accounts: t.Collection[str] | None = None) -> list[str]:
        """Return the event types that have rows, sorted.

        :param accounts: only those of rows of these accounts.
        :raises DeliveryLogError: the database refused.
        """
        return self._distinct("event_type", accounts)

    def accounts(self) -> list[str]:
        """Return the accounts that have rows, sorted.

        :raises DeliveryLogError: the database refused.
        """
        return self._distinct("account", None)

    def _distinct(self, name: str, accounts: t.Collection[str] | None) -> list[str]:
        self._prepare()
        conditions = where(self.table, Filters(accounts=accounts))
        if conditions is None:
            return []
        statement = distinct(self.table, name, conditions, self.engine.dialect.name)
        with self._begin() as conn:  # sorted here, whatever the collation
            return sorted(row[0] for row in conn.execute(statement))

    def purge(self, older_than_seconds: float, *, now: float | None = None) -> int:
        """Delete the rows received more than ``older_than_seconds`` ago and
        return how many.

        :param now: the time to purge as of; default, the current time.
        :raises DeliveryLogError: the database refused.
        """
        now = time.time() if now is None else now
        statement = sa.delete(self.table).where(self.table.c.received_at < now - older_than_seconds)
        with self._begin() as conn:
            return conn.execute(statement).rowcount

    def _prepare(self) -> None:
        self._table.ready()
        if not self._checked:
            with self._check_lock:
                if not self._checked:
                    self._check(create=self._creates)

    def _check(self, *, create: bool) -> None:
        # Until the table has every column, every use is refused: once the
        # statements of the error have run, the next use goes ahead.
        managed = self._table
        with managed.use():
            check_columns(managed.engine, self.table, DeliveryLogError)
            if create:
                search_index(managed.engine, self.table)
        self._checked = True

    @contextlib.contextmanager
    def _begin(self) -> t.Iterator[Connection]:
        self._prepare()
        with (
            self._table.use(),
            self.engine.connect() as conn,
            deadline(conn.connection.dbapi_connection, self.timeout),
            conn.begin(),
        ):
            yield conn
