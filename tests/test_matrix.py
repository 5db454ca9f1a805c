"""The guarantee matrix: each promise of the receiver, on every supported
configuration, through the real endpoint.

The configurations are the product of :data:`tests.matrix_support.STORES`
(memory, Redis, SQLite, PostgreSQL and MariaDB by URL, ``db`` on SQLite,
PostgreSQL and MariaDB), :data:`~tests.matrix_support.ACCOUNTS` (one
account; ``<account>``, ``<int:account>``, ``<uuid:account>``, and a
case-insensitive lookup returning ``Account``) and
:data:`~tests.matrix_support.DISPATCH` (sync, Celery on a real worker),
less the cells :func:`~tests.matrix_support.exclusion` leaves out, each
with its reason. The promises:

* ``test_each_distinct_id_runs_once``: ids that differ only in case, accent,
  Unicode normal form, a trailing space or an emoji, and two of 255
  characters that differ in their last, are each processed, once, for every
  account.
* ``test_each_repeat_is_a_duplicate``: each delivered again, through every
  spelling of its account's URL, is ``200`` duplicate and runs nothing.
* ``test_a_failure_runs_again_on_the_retry``: a handler failure is ``500``
  (sync) and the retry runs it again, once; on Celery the worker's retry.
* ``test_a_signed_bad_body_is_a_4xx``: a signed body that is no event is
  ``400`` with the reason; a wrong signature, another account's or an
  unknown account is ``401``; nothing runs.
* ``test_an_older_event_never_undoes_a_newer``: for one customer, a tier
  change older than one applied is skipped by the ``latest_by`` handler
  (``200``, the handler of every event still runs), one of the same second
  runs, and another account's older one runs.
* ``test_a_silent_backend_is_a_5xx_within_its_bound``: a store whose server
  stops answering (a TCP proxy on loopback that passes no byte; SQLite's
  write lock held by another connection) is ``503`` within 5 s, nothing
  runs, and the retry once it answers again is processed once; for a
  ``points.earned`` event and for a tier change (its ``latest_by`` turn
  taken with the claim).
* ``test_engine_events_see_each_claim_and_commit``: on a SQL store, a
  listener on its engine sees each delivery's claim and its commit.

The ids come from Hypothesis, one family of eight per cell and promise,
drawn anew each run (each family holds every kind of variant), without
shrinking so that a failing cell costs no more than a passing one. The
expensive set-up (a table, a key prefix, a Celery worker) is made once per
configuration and module; each example has a fresh app and ids of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
import time
import typing as t
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from flask_ploints._samples import build_event
from flask_ploints._signature import SIGNATURE_HEADER
from flask_ploints._signature import sign

from .celery_support import delete_queue
from .celery_support import until
from .matrix_support import Backend
from .matrix_support import Cell
from .matrix_support import Journal
from .matrix_support import SilentProxy
from .matrix_support import Store
from .matrix_support import Target
from .matrix_support import cells
from .matrix_support import close_app
from .matrix_support import create_app
from .support import AMQP_URL
from .support import REDIS_URL
from .support import require_service
from .test_celery import Workers

PROCESSED = (200, {"received": True})
QUEUED = (202, {"received": True, "queued": True})
DUPLICATE = (200, {"received": True, "duplicate": True})
FAILED = (500, {"error": "handler failed"})
UNAVAILABLE = (503, {"error": "dedupe store unavailable"})
INVALID_SIGNATURE = (401, {"error": "invalid signature"})
#: The sender gives up after 10 s; a silent store must answer well before.
BOUND = 5.0
#: The longest a Celery cell waits for its worker to run what it queued.
SETTLE = 10.0
#: The longest a silent request is waited for before the test fails: past
#: the sender's own timeout, the answer is lost anyway.
HUNG = 10.0

#: One example per cell and promise, drawn anew each run: every family
#: holds each kind of variant, so each run checks them all, on other stems,
#: accents, emoji and orders. No example database and no shrinking: a
#: failure costs no more than a pass, and prints its example and the
#: ``@reproduce_failure`` blob that runs it again.
MATRIX = settings(
    max_examples=1,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ACCENTS = [("é", "e"), ("ü", "u"), ("ñ", "n"), ("å", "a"), ("ç", "c")]
EMOJI = ["🎉", "👍🏽", "🇫🇷", "👩\u200d💻"]
STEMS = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
_RUN = uuid.uuid4().hex[:4]
_examples = itertools.count()


def _unique(ids: t.Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


@st.composite
def id_families(draw: st.DrawFn) -> list[str]:
    """Ids that are all different events, though a store that folds case,
    accents, normal forms or trailing spaces, or cuts long keys, would take
    some for one another; a prefix of each example's own keeps examples
    apart in a store they share.
    """
    tag = f"m{_RUN}{next(_examples):x}_"
    stem = draw(STEMS)
    accented, plain = draw(st.sampled_from(ACCENTS))
    emoji = draw(st.sampled_from(EMOJI))
    word = unicodedata.normalize("NFC", f"{tag}evt_{stem}{accented}")
    long = (f"{word}{emoji}" + "x" * 255)[:254]
    ids = [
        word,
        unicodedata.normalize("NFD", word),
        word.upper(),
        f"{tag}evt_{stem}{plain}",
        f"{word} ",
        f"{word}{emoji}",
        f"{long}x",
        f"{long}X",
    ]
    assert all(len(event_id) <= 255 for event_id in ids)
    return draw(st.permutations(_unique(ids)))


def body(event_id: str, data: dict[str, t.Any] | None = None) -> bytes:
    """An event's body as the sender's JSON encoder writes it, UTF-8."""
    event = build_event("points.earned", {"amount": 5, **(data or {})}, id=event_id)
    return json.dumps(event, ensure_ascii=False).encode()


def _points(event_id: str) -> bytes:
    return body(event_id)


def _tier(event_id: str) -> bytes:
    """A tier change of a customer of its own, a minute old."""
    return tier_change(event_id, f"{event_id}@example.com", int(time.time()) - 60)


def answer(response: TestResponse) -> tuple[int, t.Any]:
    return response.status_code, response.get_json(silent=True)


class Backends:
    """The backend of each store, made on first use, removed at the end of
    the module: a table or key prefix of its own, a SQLite file each.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: dict[str, Backend] = {}

    def get(self, store: Store) -> Backend:
        if store.service is not None:
            require_service(*store.service)
        if store.name not in self.made:
            name = f"ploints_mx_{uuid.uuid4().hex[:10]}"
            if store.database == "sqlite":
                url: str | None = f"sqlite:///{self.directory / name}.db"
            else:
                url = store.server_url
            self.made[store.name] = Backend(store, url, name)
        return self.made[store.name]

    def remove(self) -> None:
        for backend in self.made.values():
            if backend.store.kind == "redis":
                client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
                keys = list(client.scan_iter(match=f"{backend.name}:*", count=500))
                if keys:
                    client.delete(*keys)
                client.close()
            elif backend.url is not None:
                engine = sa.create_engine(backend.url)
                with engine.begin() as connection:
                    connection.execute(sa.text(f"DROP TABLE IF EXISTS {backend.name}"))
                engine.dispose()


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Backends]:
    made = Backends(tmp_path_factory.mktemp("matrix"))
    yield made
    made.remove()


@dataclass
class CeleryCell:
    """A Celery cell's worker, its queue, and its journal's Redis key."""

    workers: Workers
    namespace: str

    @property
    def journal(self) -> str:
        return f"{self.namespace}:journal"


class CeleryCells:
    """One real worker per Celery cell, started on first use and kept for
    the module: the worker builds the cell's app
    (:mod:`tests.matrix_support`) and records its handler runs in Redis.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: dict[str, CeleryCell] = {}

    def get(self, cell: Cell, backend: Backend) -> CeleryCell:
        require_service("RabbitMQ", "127.0.0.1", 5672)
        require_service("Redis", "127.0.0.1", 6379)
        if cell.id not in self.started:
            namespace = f"ploints_mx_{uuid.uuid4().hex[:10]}"
            logs = self.directory / namespace
            logs.mkdir()
            workers = Workers(AMQP_URL, REDIS_URL, namespace, logs)
            workers.app_module = "tests.matrix_support:celery"
            started = CeleryCell(workers, namespace)
            workers.config = {
                "matrix_cell": cell.id,
                "url": backend.url,
                "name": backend.name,
                "journal": started.journal,
            }
            self.started[cell.id] = started
            # A prefork parent reads the broker while its child works.
            workers.start(pool="prefork")
        return self.started[cell.id]

    def stop(self) -> None:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        for started in self.started.values():
            started.workers.stop()
            delete_queue(AMQP_URL, started.namespace)
            keys = list(client.scan_iter(match=f"{started.namespace}:*", count=500))
            if keys:
                client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def celery_cells(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[CeleryCells]:
    started = CeleryCells(tmp_path_factory.mktemp("matrix_celery"))
    yield started
    started.stop()


class Run:
    """One example on one cell: a fresh app, and what its handlers ran."""

    def __init__(self, cell: Cell, app: Flask, journal: Journal) -> None:
        self.cell = cell
        self.app = app
        self.journal = journal
        self.client = app.test_client()
        self._before = len(journal.runs())
        #: What a first delivery is answered.
        self.accepted = QUEUED if cell.dispatch == "celery" else PROCESSED

    def post(self, target: Target, data: bytes, secret: str | None = None) -> TestResponse:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(data, secret or target.secret),
        }
        return self.client.post(self.cell.accounts.url(target.segment), data=data, headers=headers)

    def runs(self) -> list[tuple[str | None, str, str]]:
        """The handler runs of this example, in order."""
        return self.journal.runs()[self._before :]

    def settle(self, count: int) -> None:
        """Wait until the worker ran ``count`` handlers (sync: at once)."""
        if self.cell.dispatch == "celery":
            until(lambda: len(self.runs()) >= count, f"the worker to run {count} handlers", SETTLE)


@contextlib.contextmanager
def running(
    cell: Cell, backends: Backends, celery_cells: CeleryCells, url: str | None = None
) -> t.Iterator[Run]:
    backend = backends.get(cell.store)
    if cell.dispatch == "celery":
        started = celery_cells.get(cell, backend)
        journal = Journal(REDIS_URL, started.journal)
        options = {"broker": AMQP_URL, "queue": started.namespace}
        app = create_app(cell, backend, journal, celery=options)
    else:
        journal = Journal()
        app = create_app(cell, backend, journal, url=url)
    try:
        yield Run(cell, app, journal)
    finally:
        close_app(app)
        journal.close()


def _ids(cell: Cell) -> str:
    return cell.id


@pytest.mark.parametrize("cell", cells("distinct"), ids=_ids)
@MATRIX
@given(data=st.data())
def test_each_distinct_id_runs_once(
    cell: Cell, backends: Backends, celery_cells: CeleryCells, data: st.DataObject
) -> None:
    family = data.draw(id_families(), "family")
    first, *others = cell.accounts.targets
    # The other accounts get some of the same ids: other events all.
    some = st.lists(st.sampled_from(family), min_size=1, max_size=2, unique=True)
    deliveries = [(first, family), *((other, data.draw(some, other.segment)) for other in others)]
    with running(cell, backends, celery_cells) as run:
        expected = []
        for target, ids in deliveries:
            for event_id in ids:
                got = answer(run.post(target, body(event_id)))
                assert got == run.accepted, f"{target.segment}, {event_id!r}: {got}"
                expected.append((target.account, event_id, "ok"))
        run.settle(len(expected))
        assert run.runs() == expected


@pytest.mark.parametrize("cell", cells("repeat"), ids=_ids)
@MATRIX
@given(data=st.data())
def test_each_repeat_is_a_duplicate(
    cell: Cell, backends: Backends, celery_cells: CeleryCells, data: st.DataObject
) -> None:
    family = data.draw(id_families(), "family")
    ids = data.draw(st.lists(st.sampled_from(family), min_size=1, max_size=3, unique=True), "ids")
    with running(cell, backends, celery_cells) as run:
        expected = []
        for target in cell.accounts.targets:
            for event_id in ids:
                got = answer(run.post(target, body(event_id)))
                assert got == run.accepted, f"{target.segment}, {event_id!r}: {got}"
                expected.append((target.account, event_id, "ok"))
        run.settle(len(expected))
        again = [*cell.accounts.same_account(), *cell.accounts.targets[1:]]
        for target in data.draw(st.permutations(again), "again"):
            for event_id in ids:
                got = answer(run.post(target, body(event_id)))
                assert got == DUPLICATE, f"{target.segment}, {event_id!r}: {got}"
        assert run.runs() == expected


@pytest.mark.parametrize("cell", cells("retry"), ids=_ids)
@MATRIX
@given(data=st.data())
def test_a_failure_runs_again_on_the_retry(
    cell: Cell, backends: Backends, celery_cells: CeleryCells, data: st.DataObject
) -> None:
    event_id = data.draw(id_families(), "ids")[0]
    first, *others = cell.accounts.same_account()
    retry_via = data.draw(st.sampled_from([first, *others]), "retry_via")
    failing = body(event_id, {"fail": True})
    account = first.account
    with running(cell, backends, celery_cells) as run:
        if cell.dispatch == "celery":
            # The worker retries the task itself.
            assert answer(run.post(first, failing)) == QUEUED
            run.settle(2)
        else:
            assert answer(run.post(first, failing)) == FAILED
            assert run.runs() == [(account, event_id, "failed")]
            assert answer(run.post(retry_via, failing)) == PROCESSED
        assert run.runs() == [(account, event_id, "failed"), (account, event_id, "ok")]
        assert answer(run.post(retry_via, failing)) == DUPLICATE
        assert run.runs() == [(account, event_id, "failed"), (account, event_id, "ok")]


def _engine(app: Flask) -> sa.Engine:
    """The engine the app's store runs its statements on."""
    if "sqlalchemy" in app.extensions:
        with app.app_context():
            return t.cast(sa.Engine, app.extensions["sqlalchemy"].engine)
    return t.cast(sa.Engine, app.extensions["ploints"]["ploints"].store.engine)


@pytest.mark.parametrize("cell", cells("visible"), ids=_ids)
@MATRIX
@given(data=st.data())
def test_engine_events_see_each_claim_and_commit(
    cell: Cell, backends: Backends, celery_cells: CeleryCells, data: st.DataObject
) -> None:
    ids = data.draw(id_families(), "family")[:4]
    table = backends.get(cell.store).name
    # By URL, autocommit statements; with db, the claim in the handlers'
    # transaction, committed with it.
    expected = ["INSERT", "UPDATE"] if cell.store.kind == "url" else ["INSERT", "COMMIT"]
    seen: list[str] = []

    def statement(conn: t.Any, cursor: t.Any, sql: str, *args: t.Any) -> None:
        # PostgreSQL's held claim opens with a WITH clause.
        for verb in ("INSERT INTO", "UPDATE"):
            if f"{verb} {table}" in sql:
                seen.append(verb.split()[0])

    def commit(conn: t.Any) -> None:
        seen.append("COMMIT")

    with running(cell, backends, celery_cells) as run:
        # The first use creates the table and checks it, in transactions.
        first, *ids = ids
        assert answer(run.post(cell.accounts.targets[0], body(first))) == PROCESSED
        engine = _engine(run.app)
        sa.event.listen(engine, "before_cursor_execute", statement)
        sa.event.listen(engine, "commit", commit)
        try:
            for event_id in ids:
                seen.clear()
                assert answer(run.post(cell.accounts.targets[0], body(event_id))) == PROCESSED
                assert seen == expected, event_id
        finally:
            sa.event.remove(engine, "before_cursor_execute", statement)
            sa.event.remove(engine, "commit", commit)


#: Signed bodies that are no event, and the answer's reason.
BAD_BODIES = [
    (b"not json", "body is not valid JSON"),
    (b'{"id": "evt_1", "type": "points.earned"', "body is not valid JSON"),
    (b"[]", "body is not a JSON object"),
    (
        json.dumps(
            {"type": "points.earned", "timestamp": "2025-06-15T10:30:00Z", "data": {}}
        ).encode(),
        "missing field 'id'",
    ),
    (
        json.dumps(build_event("points.earned", id="x" * 256)).encode(),
        "field 'id' is longer than 255 characters",
    ),
    (
        json.dumps(build_event("points.earned", id="evt\n1")).encode(),
        "field 'id' holds a control character or a lone surrogate",
    ),
    (json.dumps({**build_event("points.earned"), "id": 7}).encode(), "field 'id' must be a string"),
    (
        json.dumps({**build_event("points.earned"), "id": ""}).encode(),
        "field 'id' must not be empty",
    ),
]


@pytest.mark.parametrize("cell", cells("bad body"), ids=_ids)
def test_a_signed_bad_body_is_a_4xx(
    cell: Cell, backends: Backends, celery_cells: CeleryCells
) -> None:
    targets = cell.accounts.targets
    with running(cell, backends, celery_cells) as run:
        for target in targets:
            for data, reason in BAD_BODIES:
                got = answer(run.post(target, data))
                assert got == (400, {"error": reason}), f"{target.segment}, {data!r}: {got}"
        good = body(f"m{_RUN}_evt_unsigned")
        for target in targets:
            assert answer(run.post(target, good, secret="whsec_wrong")) == INVALID_SIGNATURE
            for other in targets:
                if other.secret != target.secret:
                    assert answer(run.post(target, good, secret=other.secret)) == INVALID_SIGNATURE
        if cell.accounts.unknown is not None:
            stranger = Target(cell.accounts.unknown, None, targets[0].secret)
            assert answer(run.post(stranger, good)) == INVALID_SIGNATURE
        assert run.runs() == []


def _proxied(url: str, port: int) -> str:
    if url.startswith("redis://"):
        return f"redis://127.0.0.1:{port}/0"
    return sa.make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _within(
    call: t.Callable[[], TestResponse], limit: float
) -> tuple[object, float, threading.Thread]:
    """Call in a thread; its answer (or exception) and how long it took, or
    ``None`` when it had not answered after ``limit`` seconds; and the
    thread, to join once the backend answers again.
    """
    result: list[object] = []

    def target() -> None:
        try:
            result.append(call())
        except Exception as exc:
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    return (result[0] if result else None), time.monotonic() - started, thread


class Silence:
    """Makes a store's backend silent, and answering again."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.proxy: SilentProxy | None = None
        self.holder: sqlite3.Connection | None = None
        assert backend.url is not None
        if backend.store.silence == "proxy":
            address = sa.make_url(backend.url) if "://" in backend.url else None
            assert address is not None
            port = address.port or (6379 if backend.store.kind == "redis" else 0)
            self.proxy = SilentProxy((address.host or "127.0.0.1", port))
            self.url = _proxied(backend.url, self.proxy.port)
        else:
            self.url = backend.url

    def start(self) -> None:
        if self.proxy is not None:
            self.proxy.silence()
        else:
            path = self.url.removeprefix("sqlite:///")
            self.holder = sqlite3.connect(path, timeout=0, isolation_level=None)
            self.holder.execute("BEGIN EXCLUSIVE")

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        elif self.holder is not None:
            self.holder.execute("ROLLBACK")
            self.holder.close()
            self.holder = None

    def close(self) -> None:
        self.stop()
        if self.proxy is not None:
            self.proxy.close()


def tier_change(event_id: str, customer: str, timestamp: int) -> bytes:
    """A ``customer.tier_changed`` event of ``customer``, sent at ``timestamp``."""
    stamp = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = {"customerEmail": customer, "tier": "gold"}
    event = build_event("customer.tier_changed", data, id=event_id, timestamp=stamp)
    return json.dumps(event, ensure_ascii=False).encode()


@pytest.mark.parametrize("cell", cells("order"), ids=_ids)
@MATRIX
@given(data=st.data())
def test_an_older_event_never_undoes_a_newer(
    cell: Cell, backends: Backends, celery_cells: CeleryCells, data: st.DataObject
) -> None:
    newer, older, tie, elsewhere = data.draw(id_families(), "family")[:4]
    customer = f"{uuid.uuid4().hex[:8]}@example.com"
    now = int(time.time())
    first, *others = cell.accounts.targets
    # (account, id, seconds ago, whether the latest_by handler runs)
    deliveries = [(first, newer, 10, True), (first, older, 40, False), (first, tie, 10, True)]
    if others and others[0].account != first.account:
        deliveries.append((others[0], elsewhere, 40, True))
    with running(cell, backends, celery_cells) as run:
        expected: list[tuple[str | None, str, str]] = []
        for target, event_id, age, applies in deliveries:
            posted = run.post(target, tier_change(event_id, customer, now - age))
            assert answer(posted) == run.accepted
            expected += [(target.account, event_id, "ok")]
            expected += [(target.account, event_id, "tier")] if applies else []
            # On Celery, each is judged before the next is sent.
            run.settle(len(expected))
        assert sorted(run.runs()) == sorted(expected)


@pytest.mark.parametrize("kind", ["points", "tier"])
@pytest.mark.parametrize("cell", cells("silence"), ids=_ids)
def test_a_silent_backend_is_a_5xx_within_its_bound(
    cell: Cell, kind: str, backends: Backends, celery_cells: CeleryCells
) -> None:
    """With ``tier``, tier changes: the store takes the latest_by handler's
    turn with the claim.
    """
    silence = Silence(backends.get(cell.store))
    target = cell.accounts.targets[0]
    before, silent = f"m{_RUN}_{uuid.uuid4().hex[:6]}_before", f"m{_RUN}_{uuid.uuid4().hex[:6]}"
    event = _points if kind == "points" else _tier
    handlers = ["ok"] if kind == "points" else ["ok", "tier"]

    def ran(*ids: str) -> list[tuple[str | None, str, str]]:
        return sorted(
            (target.account, event_id, handler) for event_id in ids for handler in handlers
        )

    try:
        with running(cell, backends, celery_cells, url=silence.url) as run:
            # A first delivery opens the connections the silence then holds.
            assert answer(run.post(target, event(before))) == PROCESSED
            silence.start()
            try:
                response, took, thread = _within(lambda: run.post(target, event(silent)), HUNG)
            finally:
                silence.stop()
            # A request still hung fails once its connections are dropped.
            thread.join(HUNG)
            assert response is not None, f"no answer after {HUNG:g} s"
            assert isinstance(response, TestResponse), response
            assert (answer(response), response.headers.get("Retry-After")) == (UNAVAILABLE, "60")
            assert took < BOUND
            assert sorted(run.runs()) == ran(before)
            # Answering again, the sender's retry is processed, once.
            assert answer(run.post(target, event(silent))) == PROCESSED
            assert answer(run.post(target, event(silent))) == DUPLICATE
            assert sorted(run.runs()) == ran(before, silent)
    finally:
        silence.close()
