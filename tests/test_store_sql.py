from __future__ import annotations

import os
import re
import threading
import time
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from flask_ploints import StoreError
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.stores import store_from_config
from flask_ploints.testing import FakeClock
from flask_ploints.testing import InspectableStoreContract
from flask_ploints.testing import PlointsClient

from .support import build_app


def _close(store: SQLAlchemyStore) -> None:
    try:
        store.close()
        store.table.drop(store.engine, checkfirst=True)
    finally:
        store.engine.dispose()


@pytest.fixture
def postgres_store(postgres_url: str, unique: str) -> t.Iterator[SQLAlchemyStore]:
    store = SQLAlchemyStore.from_url(postgres_url, table_name=unique)
    yield store
    _close(store)


@pytest.fixture
def sqlite_file_store(tmp_path: Path, unique: str) -> t.Iterator[SQLAlchemyStore]:
    store = SQLAlchemyStore.from_url(f"sqlite:///{tmp_path / 'events.db'}", table_name=unique)
    yield store
    _close(store)


@pytest.fixture
def sqlite_memory_store(unique: str) -> t.Iterator[SQLAlchemyStore]:
    store = SQLAlchemyStore.from_url("sqlite://", table_name=unique)
    yield store
    _close(store)


@pytest.fixture(params=["postgresql", "sqlite"])
def any_store(request: pytest.FixtureRequest) -> SQLAlchemyStore:
    name = "postgres_store" if request.param == "postgresql" else "sqlite_file_store"
    store: SQLAlchemyStore = request.getfixturevalue(name)
    return store


class TestPostgreSQLStore(InspectableStoreContract):
    @pytest.fixture
    def store(
        self, postgres_url: str, unique: str, clock: FakeClock
    ) -> t.Iterator[SQLAlchemyStore]:
        store = SQLAlchemyStore.from_url(postgres_url, table_name=unique, clock=clock)
        yield store
        _close(store)


class _PortableStore(SQLAlchemyStore):
    # Claims the way databases without ON CONFLICT (MySQL) do.
    _upserts: t.ClassVar[dict[str, t.Callable[[sa.Table], t.Any]]] = {}


class TestPortableClaimOnPostgreSQL(InspectableStoreContract):
    @pytest.fixture
    def store(
        self, postgres_url: str, unique: str, clock: FakeClock
    ) -> t.Iterator[SQLAlchemyStore]:
        store = _PortableStore.from_url(postgres_url, table_name=unique, clock=clock)
        yield store
        _close(store)


class TestSQLiteFileStore(InspectableStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path, unique: str, clock: FakeClock) -> t.Iterator[SQLAlchemyStore]:
        url = f"sqlite:///{tmp_path / 'events.db'}"
        store = SQLAlchemyStore.from_url(url, table_name=unique, clock=clock)
        yield store
        _close(store)


class TestSQLiteMemoryStore(InspectableStoreContract):
    @pytest.fixture
    def store(self, unique: str, clock: FakeClock) -> t.Iterator[SQLAlchemyStore]:
        store = SQLAlchemyStore.from_url("sqlite://", table_name=unique, clock=clock)
        yield store
        _close(store)


def _ids(store: SQLAlchemyStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(store.table.c.id)).scalars())


def test_the_table_has_the_documented_columns(any_store: SQLAlchemyStore) -> None:
    any_store.claim("evt_1", 60)
    columns = sa.inspect(any_store.engine).get_columns(any_store.table.name)
    assert [column["name"] for column in columns] == [
        "id",
        "status",
        "token",
        "lease_expires",
        "expires",
        "attempts",
        "error",
        "payload",
        "created_at",
        "updated_at",
    ]


def test_the_index_holds_failed_rows_only(any_store: SQLAlchemyStore) -> None:
    """Claims and commits write no entry of the index that serves the
    listing of failed events.
    """
    any_store.prepare()
    name = any_store.table.name
    with any_store.engine.connect() as connection:
        if any_store.engine.dialect.name == "postgresql":
            found = connection.execute(
                sa.text("SELECT indexdef FROM pg_indexes WHERE tablename = :name"), {"name": name}
            ).scalars()
            assert sorted(found) == [
                f"CREATE INDEX ix_{name}_failed ON public.{name} USING btree (updated_at)"
                " WHERE ((status)::text = 'failed'::text)",
                f"CREATE UNIQUE INDEX {name}_pkey ON public.{name} USING btree (id)",
            ]
        else:
            found = connection.execute(
                sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :name"),
                {"name": name},
            ).scalars()
            # The primary key's own index has no SQL.
            assert [sql for sql in found if sql] == [
                f"CREATE INDEX ix_{name}_failed ON {name} (updated_at) WHERE status = 'failed'"
            ]


def test_purge_deletes_exactly_the_expired_rows(any_store: SQLAlchemyStore) -> None:
    store = any_store
    start = time.time()
    for event_id, retention in [("done_soon", 100), ("done_later", 1000)]:
        claim = store.claim(event_id, 60)
        store.commit(event_id, claim.token, retention)
    for event_id, retention in [("failed_soon", 100), ("failed_later", 1000)]:
        claim = store.claim(event_id, 60)
        store.fail(event_id, claim.token, "boom", retention)
    store.claim("in_flight_soon", 50)
    store.claim("in_flight_later", 1000)

    assert store.purge() == 0
    assert store.purge(now=start + 200) == 2
    assert _ids(store) == {"done_later", "failed_later", "in_flight_soon", "in_flight_later"}
    # An abandoned lease is kept for inspection until the grace passes.
    assert store.purge(now=start + 200, in_flight_grace=100) == 1
    assert _ids(store) == {"done_later", "failed_later", "in_flight_later"}
    assert store.claim("done_later", 60).status is ClaimStatus.DONE


def test_payloads_are_kept_when_asked(any_store: SQLAlchemyStore) -> None:
    store = any_store
    claim = store.claim("evt_1", 60, b'{"id": "evt_1"}')
    store.fail("evt_1", claim.token, "boom", 60)
    again = store.claim("evt_1", 60)
    stored = store.get("evt_1")
    assert stored is not None
    assert stored.payload == b'{"id": "evt_1"}'
    store.commit("evt_1", again.token, 60)
    done = store.get("evt_1")
    assert done is not None
    assert done.payload == b'{"id": "evt_1"}'

    lean = SQLAlchemyStore(store.engine, table_name=store.table.name, keep_payloads=False)
    lean.claim("evt_2", 60, b'{"id": "evt_2"}')
    in_flight = lean.get("evt_2")
    assert in_flight is not None
    assert in_flight.payload is None


def test_inline_dispatch_stores_no_payload(sqlite_memory_store: SQLAlchemyStore) -> None:
    # A handler failure in the request releases the claim: a payload in the
    # store could never be replayed, so the endpoint does not send it.
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": sqlite_memory_store})
    assert PlointsClient(app).send("points.earned", id="evt_inline").status_code == 200
    stored = sqlite_memory_store.get("evt_inline")
    assert stored is not None
    assert (stored.status, stored.payload) == ("done", None)


def test_an_id_past_its_retention_starts_afresh(unique: str) -> None:
    clock = FakeClock()
    store = SQLAlchemyStore.from_url("sqlite://", table_name=unique, clock=clock)
    claim = store.claim("evt_1", 60, b"first")
    store.fail("evt_1", claim.token, "boom", 0.05)
    clock.advance(0.1)
    try:
        assert store.get("evt_1") is None
        assert store.failed() == []
        assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
        stored = store.get("evt_1")
        assert stored is not None
        assert (stored.attempts, stored.error, stored.payload) == (1, None, None)
    finally:
        _close(store)


def test_an_existing_engine_can_be_shared(postgres_url: str, unique: str) -> None:
    engine = sa.create_engine(postgres_url)
    store = SQLAlchemyStore(engine, table_name=unique, create_table=False)
    try:
        with pytest.raises(StoreError, match="UndefinedTable"):
            store.claim("evt_1", 60)
        store.create_table()
        store.create_table()
        assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
        assert sa.inspect(engine).has_table(unique)
    finally:
        _close(store)


def test_an_unreachable_database_fails_fast(unique: str) -> None:
    import psycopg

    store = SQLAlchemyStore.from_url(
        "postgresql+psycopg://postgres@127.0.0.1:1/test", table_name=unique
    )
    started = time.monotonic()
    try:
        with pytest.raises(StoreError) as caught:
            store.claim("evt_1", 60)
        # The driver's own exception, not SQLAlchemy's echo of the statement.
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        with pytest.raises(StoreError):
            store.get("evt_1")
    finally:
        store.engine.dispose()
    assert time.monotonic() - started < 3


class _Recorder:
    """What the store's psycopg cursors ran, through a ``cursor_factory``:
    each statement's first word and whether its connection was in autocommit
    mode. ``lose_next`` makes the next statement run, then lose the
    connection before its answer comes back, as when a database host goes
    away at that moment.
    """

    def __init__(self) -> None:
        import psycopg

        self.statements: list[tuple[str, bool]] = []
        self.lose_next = False
        recorder = self

        class Cursor(psycopg.Cursor[t.Any]):
            def execute(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
                text = query if isinstance(query, str) else bytes(query).decode()
                recorder.statements.append((text.split()[0].upper(), self.connection.autocommit))
                result = super().execute(query, *args, **kwargs)
                if recorder.lose_next:
                    recorder.lose_next = False
                    self.connection.close()
                    raise psycopg.OperationalError("server closed the connection unexpectedly")
                return result

        self.cursor_factory = Cursor

    def take(self) -> list[tuple[str, bool]]:
        taken, self.statements = self.statements, []
        return taken


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def recorded_store(
    postgres_url: str, unique: str, recorder: _Recorder
) -> t.Iterator[SQLAlchemyStore]:
    """A PostgreSQL store from a URL whose statements ``recorder`` sees."""
    store = SQLAlchemyStore.from_url(
        postgres_url,
        table_name=unique,
        engine_options={
            "connect_args": {"cursor_factory": recorder.cursor_factory, "application_name": unique}
        },
    )
    store.claim("evt_warm", 60)  # connects and creates the table
    recorder.take()
    yield store
    _close(store)


def test_calls_are_autocommit_statements(
    recorded_store: SQLAlchemyStore, recorder: _Recorder
) -> None:
    # No ping before a statement, no BEGIN or COMMIT around it: a new id is
    # claimed in one statement, a duplicate told apart in a second one.
    store = recorded_store
    first = store.claim("evt_1", 60, b"{}")
    assert first.status is ClaimStatus.CLAIMED
    assert recorder.take() == [("INSERT", True)]
    assert store.claim("evt_1", 60).status is ClaimStatus.IN_FLIGHT
    assert recorder.take() == [("INSERT", True), ("WITH", True)]
    assert store.commit("evt_1", first.token, 60) is True
    assert recorder.take() == [("UPDATE", True)]
    assert store.claim("evt_1", 60).status is ClaimStatus.DONE
    assert recorder.take() == [("INSERT", True), ("WITH", True)]
    second = store.claim("evt_2", 60)
    recorder.take()
    assert store.release("evt_2", second.token) is True
    assert store.get("evt_1") is not None
    assert recorder.take() == [("DELETE", True), ("SELECT", True)]


def test_a_dead_connection_is_replaced_on_the_spot(
    recorded_store: SQLAlchemyStore, recorder: _Recorder, postgres_url: str
) -> None:
    # The server ends the store's connections (a restart, an idle timeout);
    # nothing pings them, and the next call still succeeds, on a new one.
    import psycopg

    store = recorded_store
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (store.table.name,),
        ).fetchone()
    assert ended is not None and ended[0] >= 1
    time.sleep(0.2)
    recorder.take()
    claim = store.claim("evt_1", 60)
    assert claim.status is ClaimStatus.CLAIMED
    assert [word for word, _ in recorder.take()].count("INSERT") == 2
    assert store.commit("evt_1", claim.token, 60) is True


def test_a_claim_whose_answer_was_lost_is_ours(
    recorded_store: SQLAlchemyStore, recorder: _Recorder
) -> None:
    # The claim reached the database, then the connection died: the retry
    # finds the row with its own token and owns it, rather than answering
    # IN_FLIGHT to itself.
    store = recorded_store
    recorder.lose_next = True
    claim = store.claim("evt_1", 60)
    assert claim.status is ClaimStatus.CLAIMED
    stored = store.get("evt_1")
    assert stored is not None
    assert (stored.status, stored.attempts) == ("in_flight", 1)
    assert store.commit("evt_1", claim.token, 60) is True


@pytest.mark.parametrize(
    ("settle", "status"),
    [
        (lambda store, token: store.commit("evt_1", token, 60), "done"),
        (lambda store, token: store.fail("evt_1", token, "boom", 60), "failed"),
        (lambda store, token: store.release("evt_1", token), None),
        (lambda store, token: store.extend("evt_1", token, 60), "in_flight"),
    ],
    ids=["commit", "fail", "release", "extend"],
)
def test_a_settle_whose_answer_was_lost_says_it_was_done(
    recorded_store: SQLAlchemyStore,
    recorder: _Recorder,
    settle: t.Callable[[SQLAlchemyStore, str], bool],
    status: str | None,
) -> None:
    store = recorded_store
    claim = store.claim("evt_1", 60)
    recorder.lose_next = True
    assert settle(store, claim.token) is True
    stored = store.get("evt_1")
    assert (stored and stored.status) == status
    # A token that never owned the id still gets False after a retry.
    recorder.lose_next = True
    assert store.commit("evt_1", "not-the-token", 60) is False


def test_a_shared_engine_gets_its_connections_back_unchanged(
    postgres_url: str, unique: str, recorder: _Recorder
) -> None:
    # An engine the app also uses for transactions: the store switches a
    # connection to autocommit for its call only.
    engine = sa.create_engine(
        postgres_url, connect_args={"cursor_factory": recorder.cursor_factory}
    )
    store = SQLAlchemyStore(engine, table_name=unique)
    try:
        claim = store.claim("evt_1", 60)
        recorder.take()
        assert store.commit("evt_1", claim.token, 60) is True
        assert recorder.take() == [("UPDATE", True)]
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
            conn.execute(sa.delete(store.table))
            conn.rollback()
        assert store.claim("evt_1", 60).status is ClaimStatus.DONE
    finally:
        _close(store)


def test_sqlite_claims_with_on_conflict(sqlite_file_store: SQLAlchemyStore) -> None:
    import sqlite3

    store = sqlite_file_store
    assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
    # RETURNING came with SQLite 3.35; older ones take the portable way.
    assert store.engine.dialect.insert_returning is (sqlite3.sqlite_version_info >= (3, 35))
    assert store.claim("evt_1", 60).status is ClaimStatus.IN_FLIGHT


def test_store_errors_do_not_echo_the_payload(sqlite_memory_store: SQLAlchemyStore) -> None:
    store = sqlite_memory_store
    store.claim("evt_1", 60)
    with store.engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE "{store.table.name}"'))
    with pytest.raises(StoreError) as caught:
        store.claim("evt_2", 60, b"secret-customer@example.com")
    assert "no such table" in str(caught.value)
    assert "secret-customer" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", "psycopg"),
        ("postgres://postgres@127.0.0.1:5432/test", "psycopg"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/test", "psycopg"),
        ("sqlite:///{tmp}/events.db", "pysqlite"),
        ("sqlite://", "pysqlite"),
    ],
)
def test_store_from_config_builds_a_sql_store(url: str, driver: str, tmp_path: Path) -> None:
    url = url.format(tmp=tmp_path)
    store = store_from_config(url, {"PLOINTS_SQL_TABLE": "myapp_events"})
    assert isinstance(store, SQLAlchemyStore)
    try:
        assert store.engine.dialect.driver == driver
        assert store.table.name == "myapp_events"
        assert isinstance(store.engine.pool, StaticPool) is (url == "sqlite://")
    finally:
        store.engine.dispose()
    default = store_from_config(url, {})
    assert isinstance(default, SQLAlchemyStore)
    assert default.table.name == "ploints_events"
    default.engine.dispose()


def test_store_from_config_sends_mysql_to_sqlalchemy() -> None:
    # No MySQL driver is installed here: the error comes from SQLAlchemy
    # loading its mysql dialect's driver.
    with pytest.raises(ImportError, match="MySQLdb"):
        store_from_config("mysql://user@127.0.0.1/db", {})


def test_store_from_config_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match=re.escape("unknown store 'mongodb://127.0.0.1/db'")):
        store_from_config("mongodb://127.0.0.1/db", {})


def test_a_store_from_a_url_reuses_one_pooled_connection(postgres_url: str, unique: str) -> None:
    import psycopg

    store = SQLAlchemyStore.from_url(
        postgres_url,
        table_name=unique,
        engine_options={"connect_args": {"application_name": unique}},
    )
    try:
        for number in range(5):
            claim = store.claim(f"evt_{number}", 60)
            assert store.commit(f"evt_{number}", claim.token, 60) is True
        # Each call checks a connection out of the pool and back; the last
        # given back serves the next (pool_use_lifo).
        assert store.engine.pool.checkedout() == 0
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (unique,)
            ).fetchone()
        assert row is not None and row[0] <= 2
        store.close()
        assert store.engine.pool.checkedin() == 0
        # Used again after close, it connects again.
        assert store.claim("evt_again", 60).status is ClaimStatus.CLAIMED
    finally:
        _close(store)


@pytest.fixture(params=["postgres", "mariadb", "sqlite"])
def seen_store(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> t.Iterator[SQLAlchemyStore]:
    """A store from a URL on each database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
    else:
        url = request.getfixturevalue(f"{request.param}_url")
    store = SQLAlchemyStore.from_url(url, table_name=unique)
    store.create_table()
    yield store
    _close(store)


def test_a_body_of_the_largest_size_is_kept_whole(seen_store: SQLAlchemyStore) -> None:
    # PLOINTS_WEBHOOK_MAX_BYTES's default; MySQL's BLOB would hold 64 KiB.
    payload = bytes(range(256)) * (1024 * 1024 // 256)
    claim = seen_store.claim("evt_big", 60, payload)
    assert seen_store.fail("evt_big", claim.token, "boom", 60) is True
    stored = seen_store.get("evt_big")
    assert stored is not None and stored.payload == payload


def test_engine_events_see_every_statement(seen_store: SQLAlchemyStore) -> None:
    # What echo, Flask-SQLAlchemy's recorded queries and the SQLAlchemy
    # instrumentation of OpenTelemetry or Sentry listen to.
    store = seen_store
    seen: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        if store.table.name in statement:
            seen.append(statement.split()[0].upper())

    claim = store.claim("evt_1", 60, b"{}")
    assert seen == ["INSERT"]
    assert store.commit("evt_1", claim.token, 60) is True
    assert seen == ["INSERT", "UPDATE"]
    seen.clear()
    assert store.claim("evt_1", 60).status is ClaimStatus.DONE
    assert seen[0] == "INSERT" and len(seen) >= 2
    seen.clear()
    assert store.get("evt_1") is not None
    assert store.failed() == []
    assert store.purge() == 0
    assert seen == ["SELECT", "SELECT", "DELETE"]


def test_hide_parameters_keeps_payloads_out_of_errors(seen_store: SQLAlchemyStore) -> None:
    # from_url's engines hide parameters: SQLAlchemy's own error, as a
    # handle_error listener (Sentry's, a log) sees it, carries none.
    store = seen_store
    assert store.engine.hide_parameters is True
    errors: list[str] = []

    @sa.event.listens_for(store.engine, "handle_error")
    def record(context: t.Any) -> None:
        errors.append(str(context.sqlalchemy_exception))

    store.claim("evt_1", 60)
    store.table.drop(store.engine)
    with pytest.raises(StoreError) as caught:
        store.claim("evt_2", 60, b"secret-customer@example.com")
    assert errors and all("parameters hidden" in error for error in errors)
    assert not any("secret-customer" in error for error in [*errors, str(caught.value)])


@pytest.mark.parametrize("database", ["postgres", "mariadb", "sqlite"])
def test_statements_compiled_once_send_what_execute_sends(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # The store compiles each statement once and runs it with
    # exec_driver_sql: each sends the SQL and parameters that
    # Connection.execute sends for the statement.
    from flask_ploints.stores._sql.store import _Compiled

    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
    else:
        url = request.getfixturevalue(f"{database}_url")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    store = SQLAlchemyStore(engine)
    now = time.time()
    values = {
        "event_id": "evt_1",
        "claim_token": "a-token",
        "now": now,
        "lease_end": now + 60,
        "keep_until": now + 60,
        "body": b"{}",
        "reason": "boom",
        "attempts": 6,
        "abandoned_before": now - 86400,
        "limit": 10,
    }
    sent: list[tuple[str, t.Any]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def record(conn: t.Any, cursor: t.Any, statement: str, parameters: t.Any, *args: t.Any) -> None:
        sent.append((statement, parameters))

    try:
        store.create_table()
        statements = store._sql.all()
        assert {"insert", "commit", "failed"} <= set(statements)
        with engine.connect() as conn:
            for name, statement in statements.items():
                # Its own parameters only: others named like a column would
                # be SET by an UPDATE.
                own = statement.compile(dialect=engine.dialect).params
                params = {key: values[key] for key in own if key in values}
                conn.execute(statement, params)
                compiled = _Compiled(statement, engine.dialect)
                expected = (compiled.sql, compiled.parameters(params))
                assert _plain(sent[-1]) == _plain(expected), name
                conn.rollback()
    finally:
        store.table.drop(engine, checkfirst=True)
        engine.dispose()


def _plain(sent: tuple[str, t.Any]) -> tuple[str, t.Any]:
    # psycopg's Binary wrapper compares by identity; compare what it wraps.
    sql, parameters = sent

    def plain(value: t.Any) -> t.Any:
        return (type(value), value.obj) if type(value).__name__ == "Binary" else value

    if isinstance(parameters, dict):
        return sql, {key: plain(value) for key, value in parameters.items()}
    return sql, tuple(plain(value) for value in parameters)


def test_many_threads_share_the_pool(postgres_url: str, unique: str) -> None:
    # More threads than the pool's size plus overflow (5 + 10), as a
    # gthread server has: none waits long on the pool, and the store never
    # opens more than the pool holds.
    store = SQLAlchemyStore.from_url(postgres_url, table_name=unique)
    store.create_table()
    threads = 50
    start = threading.Barrier(threads)
    durations: list[float] = []
    errors: list[BaseException] = []

    def deliver(number: int) -> None:
        start.wait()
        started = time.monotonic()
        try:
            claim = store.claim(f"evt_{number}", 60)
            assert claim.status is ClaimStatus.CLAIMED
            assert store.commit(f"evt_{number}", claim.token, 60) is True
        except BaseException as exc:
            errors.append(exc)
        durations.append(time.monotonic() - started)

    try:
        workers = [threading.Thread(target=deliver, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        assert len(durations) == threads
        assert max(durations) < 2.0
        assert store.engine.pool.checkedout() == 0
        assert store.engine.pool.checkedin() <= 15
        assert _ids(store) == {f"evt_{number}" for number in range(threads)}
    finally:
        _close(store)


def test_a_call_waits_for_a_free_connection_within_the_timeout(
    postgres_url: str, unique: str
) -> None:
    store = SQLAlchemyStore.from_url(
        postgres_url,
        table_name=unique,
        timeout=0.5,
        engine_options={"pool_size": 1, "max_overflow": 0},
    )
    try:
        store.create_table()
        held = store.engine.connect()  # another call, still running
        started = time.monotonic()
        with pytest.raises(StoreError, match="QueuePool limit of size 1 overflow 0 reached"):
            store.claim("evt_1", 60)
        assert 0.5 <= time.monotonic() - started < 1.5
        # Given back, it serves the next call.
        held.close()
        assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
        assert store.engine.pool.checkedout() == 0
    finally:
        _close(store)


def test_a_forked_child_leaves_the_parents_connections_alone(
    postgres_url: str, unique: str
) -> None:
    store = SQLAlchemyStore.from_url(postgres_url, table_name=unique)
    try:
        claim = store.claim("evt_parent", 60)  # creates the table, keeps one
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                child = store.claim("evt_child", 60)
                code = 0 if store.commit("evt_child", child.token, 60) else 1
                store.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's kept connection still answers, and sees the child's row.
        assert store.commit("evt_parent", claim.token, 60) is True
        assert store.claim("evt_child", 60).status is ClaimStatus.DONE
    finally:
        _close(store)


def test_a_shared_engine_replaces_its_dead_connections(postgres_url: str, unique: str) -> None:
    # The server ends every connection of a shared engine's pool: the call
    # on the first one runs again on one it pinged, not on the next dead one.
    import psycopg

    engine = sa.create_engine(postgres_url, connect_args={"application_name": unique})
    store = SQLAlchemyStore(engine, table_name=unique)
    try:
        store.create_table()
        connections = [engine.raw_connection() for _ in range(3)]
        for connection in connections:
            connection.close()  # three idle in the pool
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (unique,),
            )
        time.sleep(0.2)
        claim = store.claim("evt_1", 60)
        assert claim.status is ClaimStatus.CLAIMED
        assert store.commit("evt_1", claim.token, 60) is True
    finally:
        _close(store)
