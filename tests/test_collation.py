"""Event ids, and every other key the SQL tables keep, compare byte for byte
on every database: ids that a collation would fold together (case, accents,
trailing spaces, NFC and NFD, the Kelvin sign) are distinct events, through
the endpoint, with the SQL store from a URL and with ``db``, on MariaDB,
PostgreSQL and SQLite. A table of an earlier build that folds them is
refused on first use, with the statement that fixes it. A key no row can
hold (a NUL, which PostgreSQL refuses in text) finds nothing on every
database.
"""

from __future__ import annotations

import typing as t
import unicodedata
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_ploints import Event
from flask_ploints import StoreError
from flask_ploints.delivery_log import DeliveryLog
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.testing import PlointsClient

from .session_app import DUPLICATE
from .session_app import PROCESSED
from .session_app import Shop
from .session_app import answer
from .session_app import body
from .session_app import database_url
from .support import build_app

#: Pairs of distinct ids that MariaDB's default collation takes for one.
FIXED_PAIRS = [
    ("evt_AbC123", "evt_abc123"),
    ("evt_x1", "evt_x1 "),
    ("evt_café", "evt_cafe"),
    ("evt_ß", "evt_s"),
    ("evt_k1", "evt_\u212a1"),
]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéèêëüöäàçñÉÜßøå"


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


#: How a collation folds an id into another.
_FOLDS: dict[str, t.Callable[[str], tuple[str, str]]] = {
    "case": lambda text: (text, text.swapcase()),
    "trailing space": lambda text: (text, text + " " * 2),
    "accent": lambda text: (text, _strip_accents(text)),
    "NFC and NFD": lambda text: (
        unicodedata.normalize("NFC", text),
        unicodedata.normalize("NFD", text),
    ),
}


@st.composite
def colliding_ids(draw: st.DrawFn) -> tuple[str, str]:
    """Two distinct ids that one of :data:`_FOLDS` takes for one."""
    text = draw(st.text(_LETTERS, min_size=1, max_size=20))
    fold = draw(st.sampled_from(sorted(_FOLDS)))
    first, second = _FOLDS[fold](text)
    # A fold that changes nothing (no letter to change) is no pair.
    assume(first != second)
    return first, second


@pytest.fixture(params=["mariadb", "postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, request.param, tmp_path)


class Receiver(t.Protocol):
    runs: list[str]
    sender: PlointsClient


class _UrlReceiver:
    """An app whose dedupe store is the SQL store from ``url``."""

    def __init__(self, url: str, table: str) -> None:
        self.runs: list[str] = []
        self.table = table
        self.app, webhooks = build_app({"PLOINTS_DEDUPE_STORE": url, "PLOINTS_SQL_TABLE": table})
        webhooks.on_any(self.handle)
        self.sender = PlointsClient(self.app)
        self.url = url

    def handle(self, event: Event) -> None:
        self.runs.append(event.id)

    def close(self) -> None:
        store = self.app.extensions["ploints"]["ploints"].store
        assert isinstance(store, SQLAlchemyStore)
        try:
            store.close()
            store.table.drop(store.engine, checkfirst=True)
        finally:
            store.engine.dispose()


@pytest.fixture(params=["url", "db"])
def receiver(request: pytest.FixtureRequest, database: str, unique: str) -> t.Iterator[Receiver]:
    made: _UrlReceiver | Shop = (
        _UrlReceiver(database, unique) if request.param == "url" else Shop(database, unique)
    )
    yield made
    made.close()


def _both_run_once(receiver: Receiver, first: str, second: str) -> None:
    runs = len(receiver.runs)
    assert answer(receiver.sender.post(body(first))) == (200, PROCESSED)
    assert answer(receiver.sender.post(body(second))) == (200, PROCESSED)
    assert answer(receiver.sender.post(body(first))) == (200, DUPLICATE)
    assert answer(receiver.sender.post(body(second))) == (200, DUPLICATE)
    assert receiver.runs[runs:] == [first, second]


@pytest.mark.parametrize(("first", "second"), FIXED_PAIRS)
def test_ids_a_collation_folds_are_distinct_events(
    receiver: Receiver, first: str, second: str
) -> None:
    _both_run_once(receiver, first, second)


def test_emoji_ids_round_trip(receiver: Receiver) -> None:
    _both_run_once(receiver, "evt_\U0001f600", "evt_\U0001f601")


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pair=colliding_ids())
def test_generated_colliding_ids_are_distinct_events(
    receiver: Receiver, pair: tuple[str, str]
) -> None:
    # A prefix of its own per example: the trailing fold is at the end.
    prefix = f"evt_{uuid.uuid4().hex[:8]}_"
    _both_run_once(receiver, prefix + pair[0], prefix + pair[1])


def _old_table(engine: sa.Engine, table: str, collation: str) -> None:
    """A store table as an earlier build made it, its id of ``collation``."""
    columns = SQLAlchemyStore(engine, table_name=table).table.columns
    legacy = sa.Table(
        table,
        sa.MetaData(),
        *(
            sa.Column(c.name, sa.String(255, collation=collation), primary_key=True)
            if c.name == "id"
            else sa.Column(c.name, c.type, nullable=c.nullable)
            for c in columns
        ),
    )
    legacy.create(engine)


#: Per database: a folding collation of an earlier build's table, and the
#: start of the fix the error names.
_OLD_TABLES = {
    "mariadb": (
        "utf8mb4_general_ci",
        "ALTER TABLE {table} MODIFY id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL",
    ),
    "postgresql": (
        "ploints_test_ci",
        'ALTER TABLE {table} ALTER COLUMN id TYPE VARCHAR(255) COLLATE "C"',
    ),
    "sqlite": ("NOCASE", "copy {table} into a new table whose id has no COLLATE clause"),
}


@pytest.mark.parametrize("name", sorted(_OLD_TABLES))
def test_a_folding_table_is_refused_with_its_fix(
    request: pytest.FixtureRequest, name: str, tmp_path: Path, unique: str
) -> None:
    url = database_url(request, name, tmp_path)
    collation, fix = _OLD_TABLES[name]
    engine = sa.create_engine(url)
    if name == "postgresql":
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "CREATE COLLATION IF NOT EXISTS ploints_test_ci"
                    " (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
                )
            )
    _old_table(engine, unique, collation)
    store = SQLAlchemyStore.from_url(url, table_name=unique)
    try:
        with pytest.raises(StoreError) as caught:
            store.claim("evt_1", 60)
        message = str(caught.value)
        assert message.startswith(
            f"the table {unique!r} compares id ({collation}) by a collation that folds case,"
            " accents or trailing spaces, so distinct ids would be taken for one; fix it with: "
        )
        assert fix.format(table=unique) in message
        if name != "sqlite":
            # The fix it names works, and the store goes on.
            statement = message.split("fix it with: ", 1)[1]
            with engine.begin() as connection:
                connection.execute(sa.text(statement))
            assert store.claim("evt_1", 60).token is not None
            assert store.claim("evt_1 ", 60).token is not None
    finally:
        store.close()
        store.engine.dispose()
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {unique}"))
        engine.dispose()


@pytest.fixture
def logged(database: str, unique: str) -> t.Iterator[tuple[DeliveryLog, PlointsClient]]:
    """A delivery log on ``database`` and a sender to an app that keeps it."""
    log = DeliveryLog.from_url(database, table_name=unique)
    app, _ = build_app(
        {
            "SECRET_KEY": "test-secret-key",
            "PLOINTS_DELIVERY_LOG": log,
            "PLOINTS_DELIVERY_LOG_ACCESS": lambda: True,
        }
    )
    try:
        yield log, PlointsClient(app)
    finally:
        log.table.drop(log.engine, checkfirst=True)
        log.engine.dispose()


def test_delivery_log_keeps_folded_ids_apart(logged: tuple[DeliveryLog, PlointsClient]) -> None:
    log, sender = logged
    for first, second in FIXED_PAIRS:
        assert sender.post(body(first)).status_code == 200
        assert sender.post(body(second)).status_code == 200
        assert [d.event_id for d in log.recent(event_id=first)] == [first]
        assert [d.event_id for d in log.recent(event_id=second)] == [second]


def test_delivery_log_filter_of_a_nul_finds_nothing(
    logged: tuple[DeliveryLog, PlointsClient],
) -> None:
    log, sender = logged
    assert sender.post(body("evt_1")).status_code == 200
    # The page refuses the filter (a NUL is no account's), the log finds
    # nothing for it.
    page = sender.client.get("/ploints/deliveries?account=%00")
    assert page.status_code == 400
    assert "evt_1" not in page.get_data(as_text=True)
    assert sender.client.get("/ploints/deliveries?account=acct%00x").status_code == 400
    assert log.recent(account="\x00") == []
    assert log.recent(event_id="evt_1\x00") == []
    assert log.recent(event_type="points.earned\x00") == []
