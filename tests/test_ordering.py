"""Events out of order: ``latest_by`` (see docs/ordering.rst)."""

from __future__ import annotations

import collections
import json
import logging
import queue
import random
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import signals
from flask_ploints._errors import ConfigError
from flask_ploints._ordering import OrderedStore
from flask_ploints._samples import build_event
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import rerun
from flask_ploints.stores import MemoryStore
from flask_ploints.stores import RedisStore
from flask_ploints.stores import SQLAlchemyStore
from flask_ploints.testing import PlointsClient

from . import ordering_app
from .ordering_app import EMAIL
from .ordering_app import KINDS
from .ordering_app import Loyalty
from .ordering_app import stamp
from .support import build_app

Make = t.Callable[..., Loyalty]
#: The stores that are shared between processes.
SHARED = [kind for kind in KINDS if kind != "memory"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", KINDS)
def test_newer_then_older_skips_only_that_handler(make_loyalty: Make, kind: str) -> None:
    loyalty = make_loyalty(kind)
    assert loyalty.send("gold", 2000, id="evt_gold") == 200
    assert loyalty.send("silver", 1000, id="evt_silver") == 200
    assert loyalty.applied == [("gold", 2000)]
    assert loyalty.audited == ["evt_gold", "evt_silver"]
    # Dedupe recorded the stale event's id: a retry of it is a duplicate.
    response = loyalty.sender.send(
        "customer.tier_changed",
        {"customerEmail": EMAIL, "previousTier": "bronze", "newTier": "silver"},
        id="evt_silver",
        timestamp=stamp(1000),
    )
    assert response.get_json() == {"received": True, "duplicate": True}
    assert loyalty.send("platinum", 3000) == 200
    assert loyalty.applied == [("gold", 2000), ("platinum", 3000)]
    if loyalty.db is not None:
        assert loyalty.committed() == ("platinum", [2000, 3000])


@pytest.mark.parametrize("kind", KINDS)
def test_each_key_is_ordered_on_its_own(make_loyalty: Make, kind: str) -> None:
    loyalty = make_loyalty(kind)
    assert loyalty.send("gold", 2000) == 200
    data = {"customerEmail": "joe@example.com", "previousTier": "bronze", "newTier": "silver"}
    response = loyalty.sender.send("customer.tier_changed", data, timestamp=stamp(1000))
    assert response.status_code == 200
    assert loyalty.applied == [("gold", 2000), ("silver", 1000)]


@pytest.mark.parametrize("kind", KINDS)
def test_ties_run(make_loyalty: Make, kind: str) -> None:
    loyalty = make_loyalty(kind)
    assert loyalty.send("gold", 2000) == 200
    assert loyalty.send("silver", 2000) == 200
    assert loyalty.applied == [("gold", 2000), ("silver", 2000)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_failure_advances_nothing(make_loyalty: Make, kind: str) -> None:
    loyalty = make_loyalty(kind)
    assert loyalty.send("silver", 1000) == 200
    loyalty.broken = True
    assert loyalty.send("gold", 3000, id="evt_gold") == 500
    loyalty.broken = False
    # Judged against silver, not the gold that failed.
    assert loyalty.send("bronze", 2000) == 200
    assert loyalty.send("gold", 3000, id="evt_gold") == 200
    assert loyalty.applied == [("silver", 1000), ("gold", 3000), ("bronze", 2000), ("gold", 3000)]
    if loyalty.db is not None:
        assert loyalty.committed() == ("gold", [1000, 2000, 3000])


@pytest.mark.parametrize("kind", SHARED)
def test_the_newest_applied_survives_another_process(
    make_loyalty: Make, kind: str, unique: str
) -> None:
    loyalty = make_loyalty(kind)
    assert loyalty.send("gold", 2000) == 200
    url = loyalty.app.config["PLOINTS_DEDUPE_STORE"]
    if loyalty.db is not None:
        url = loyalty.app.config["SQLALCHEMY_DATABASE_URI"]

    def other(seconds: int) -> dict[str, t.Any]:
        command = [sys.executable, "-m", "tests.ordering_app", kind, url, unique]
        command += [str(seconds), str(ordering_app.BASE)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        found: dict[str, t.Any] = json.loads(done.stdout)
        return found

    assert other(1000) == {"status": 200, "applied": []}
    assert other(3000) == {"status": 200, "applied": [["tier3000", 3000]]}
    assert loyalty.send("silver", 2500) == 200
    assert loyalty.applied == [("gold", 2000)]
    if loyalty.db is not None:
        assert loyalty.committed() == ("tier3000", [2000, 3000])


def deliver_all(loyalty: Loyalty, events: list[tuple[str, int]], senders: int) -> int:
    """Deliver ``events`` (each a distinct event) from ``senders`` threads,
    each retrying a ``409`` until it is answered ``200``; the number of
    ``409`` answers.
    """
    pending: queue.Queue[tuple[str, str, int]] = queue.Queue()
    for number, (tier, seconds) in enumerate(events):
        pending.put((f"evt_{number}", tier, seconds))
    conflicts = []
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            while True:
                try:
                    event_id, tier, seconds = pending.get_nowait()
                except queue.Empty:
                    return
                deadline = time.monotonic() + 60
                while (status := loyalty.send(tier, seconds, id=event_id)) == 409:
                    conflicts.append(event_id)
                    assert time.monotonic() < deadline
                    time.sleep(random.uniform(0.0, 0.02))
                assert status == 200, status
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return len(conflicts)


@pytest.mark.parametrize("kind", ["redis", "db-postgresql", "sql-postgresql", "memory"])
def test_concurrent_senders_never_apply_an_older_after_a_newer(
    make_loyalty: Make, kind: str
) -> None:
    loyalty = make_loyalty(kind)
    seconds = list(range(1000, 1024))
    shuffled = seconds[:]
    random.Random(7).shuffle(shuffled)
    loyalty.delay = 0.01
    deliver_all(loyalty, [(f"t{s}", s) for s in shuffled], senders=8)
    applied = [moment for _, moment in loyalty.applied]
    assert applied == sorted(set(applied))
    assert applied[-1] == 1023
    assert len(loyalty.audited) == 24
    if loyalty.db is not None:
        tier, rows = loyalty.committed()
        assert tier == "t1023"
        assert rows == applied


#: The store methods a delivery may call.
CALLS = ("claim", "commit", "release", "order_begin", "order_end")
FOLDED = ("claim_with_turns", "commit_with_turns")


def counted(base: type[t.Any]) -> type[t.Any]:
    """``base``, a real store, with a count of the calls of each method a
    delivery may make, in :attr:`calls`.
    """

    class Counted(base):
        calls: collections.Counter[str]

        def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
            super().__init__(*args, **kwargs)
            self.calls = collections.Counter()

    def counting(name: str) -> t.Callable[..., t.Any]:
        def method(self: Counted, *args: t.Any, **kwargs: t.Any) -> t.Any:
            self.calls[name] += 1
            return getattr(super(Counted, self), name)(*args, **kwargs)

        return method

    for name in CALLS + FOLDED:
        setattr(Counted, name, counting(name))
    return Counted


@pytest.mark.parametrize("kind", ["memory", "redis", "sql-postgresql"])
def test_a_delivery_takes_its_turns_with_its_claim(
    make_loyalty: Make, kind: str, unique: str, request: pytest.FixtureRequest
) -> None:
    store: t.Any
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        store = counted(RedisStore).from_url(url, prefix=f"{unique}:")
    elif kind == "sql-postgresql":
        url = request.getfixturevalue("postgres_url")
        store = counted(SQLAlchemyStore).from_url(url, table_name=unique)
    else:
        store = counted(MemoryStore)()
    loyalty = make_loyalty(kind, PLOINTS_DEDUPE_STORE=store)
    assert loyalty.send("gold", 2000) == 200
    assert loyalty.send("silver", 1000) == 200
    assert loyalty.send("gold", 2000) == 200
    # Two store calls a delivery, as without latest_by: the turn is taken
    # with the claim, and ends with the commit.
    assert store.calls == {"claim_with_turns": 3, "commit_with_turns": 3}
    assert loyalty.applied == [("gold", 2000), ("gold", 2000)]
    loyalty.broken = True
    assert loyalty.send("platinum", 3000) == 500
    # A failure ends the turn, then releases the claim.
    assert store.calls == {
        "claim_with_turns": 4,
        "commit_with_turns": 3,
        "order_end": 1,
        "release": 1,
    }
    if kind == "sql-postgresql":
        store.close()


def test_a_new_delivery_with_latest_by_runs_two_statements_on_postgresql(
    make_loyalty: Make, unique: str, postgres_url: str
) -> None:
    store = SQLAlchemyStore.from_url(postgres_url, table_name=unique)
    store.prepare()
    store.prepare_order()
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    loyalty = make_loyalty("sql-postgresql", PLOINTS_DEDUPE_STORE=store)
    # New, stale, a tie: a new id's claim takes its turn, and its commit
    # ends it. The stale one's claim takes none, so the store asks again:
    # the claim, the turn, why it was not taken.
    assert [loyalty.send(*sent) for sent in [("gold", 2000), ("silver", 1000), ("gold", 2000)]] == [
        200,
        200,
        200,
    ]
    assert loyalty.applied == [("gold", 2000), ("gold", 2000)]
    claim = ["WITH", "claimed", "AS", "(INSERT"]
    commit = ["WITH", "ended", "AS", "(UPDATE"]
    order = f"{unique}_order"
    assert [statement.split()[:4] for statement in statements] == [
        claim,
        commit,
        claim,
        claim,
        ["UPDATE", order, "SET", "token=%(turn_token)s::VARCHAR,"],
        ["SELECT", f"{order}.newest,", f"{order}.expires,", f"{order}.token,"],
        ["UPDATE", unique, "SET", "status='done',"],
        claim,
        commit,
    ]
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_each_guarded_handler_of_an_event_is_judged_on_its_own_key(
    make_loyalty: Make, kind: str
) -> None:
    loyalty = make_loyalty(kind)
    everyone: list[str] = []
    loyalty.webhooks.on("customer.tier_changed", latest_by=lambda e: "all", name="everyone")(
        lambda event: everyone.append(event.data["newTier"])
    )
    assert loyalty.send("gold", 2000) == 200
    data = {"customerEmail": "joe@example.com", "previousTier": "bronze", "newTier": "silver"}
    response = loyalty.sender.send("customer.tier_changed", data, timestamp=stamp(1000))
    assert response.status_code == 200
    # Joe's first tier applies; for everyone, 1000 is older than 2000.
    assert loyalty.applied == [("gold", 2000), ("silver", 1000)]
    assert everyone == ["gold"]


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_handler_applied_advances_when_a_later_one_fails(
    make_loyalty: Make, kind: str
) -> None:
    loyalty = make_loyalty(kind)
    failing = True

    def later_key(event: Event) -> str:
        # Found before the claim too: that first failure is put off to the
        # handler's own run.
        if failing:
            raise KeyError("customerEmail")
        return str(event.data["customerEmail"])

    later: list[str] = []
    loyalty.webhooks.on("customer.tier_changed", latest_by=later_key, name="later")(
        lambda event: later.append(event.id)
    )
    assert loyalty.send("gold", 2000, id="evt_gold") == 500
    failing = False
    # The failed delivery's turns ended (else: 409).
    assert loyalty.send("silver", 1000, id="evt_silver") == 200
    if loyalty.db is None:
        # The tier handler's write of gold is done: silver is older.
        assert loyalty.applied == [("gold", 2000)]
    else:
        # Rolled back with the delivery: nothing was applied.
        assert loyalty.applied == [("gold", 2000), ("silver", 1000)]
        assert loyalty.committed() == ("silver", [1000])
    assert later == ["evt_silver"]
    # The retry of gold ties with, or beats, what was applied.
    assert loyalty.send("gold", 2000, id="evt_gold") == 200
    assert later == ["evt_silver", "evt_gold"]
    assert loyalty.applied[-1] == ("gold", 2000)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_rerun_ends_its_turns_and_advances_nothing(make_loyalty: Make, kind: str) -> None:
    loyalty = make_loyalty(kind)
    assert loyalty.send("silver", 1000) == 200
    loyalty.broken = True
    data = {"customerEmail": EMAIL, "previousTier": "bronze", "newTier": "gold"}
    body = json.dumps(build_event("customer.tier_changed", data, timestamp=stamp(3000)))
    assert rerun(loyalty.app, body.encode()) is ReplayOutcome.FAILED
    loyalty.broken = False
    # Judged against silver; the rerun's turn ended (else: 409).
    assert loyalty.send("bronze", 2000) == 200
    assert loyalty.applied == [("silver", 1000), ("gold", 3000), ("bronze", 2000)]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    order=st.permutations(range(8)),
    retries=st.lists(st.integers(0, 7), max_size=6),
)
def test_any_order_with_retries_ends_with_the_newest(order: list[int], retries: list[int]) -> None:
    loyalty = Loyalty("memory", "memory", "ploints_events")
    deliveries = list(order)
    # A retry of an event already delivered, anywhere after it.
    for event in retries:
        at = deliveries.index(event)
        deliveries.insert(random.Random(event).randint(at + 1, len(deliveries)), event)
    for event in deliveries:
        assert loyalty.send(f"t{event}", 1000 + event, id=f"evt_{event}") == 200
    applied = [moment for _, moment in loyalty.applied]
    assert applied == sorted(set(applied))
    assert applied[-1] == 1007
    assert sorted(set(loyalty.audited)) == sorted(f"evt_{event}" for event in range(8))


@pytest.mark.parametrize("kind", ["memory", "redis", "sql-postgresql", "sql-sqlite"])
def test_a_key_held_by_another_delivery_answers_409(make_loyalty: Make, kind: str) -> None:
    loyalty = make_loyalty(kind)
    store = loyalty.webhooks.receiver(loyalty.app).store
    assert isinstance(store, OrderedStore)
    # Another delivery's turn on the key, as the receiver takes it.
    key = f"tests.ordering_app.Loyalty.tier\x1f{EMAIL}"
    turn = store.order_begin(key, 1_000_000, 30.0)
    started = time.monotonic()
    response = loyalty.sender.send(
        "customer.tier_changed",
        {"customerEmail": EMAIL, "previousTier": "bronze", "newTier": "gold"},
        id="evt_busy",
        timestamp=stamp(2000),
    )
    assert response.status_code == 409
    assert 28 <= int(response.headers["Retry-After"]) <= 30
    assert time.monotonic() - started < 5
    assert loyalty.applied == []
    # The claim was released: once the turn ends, the retry runs.
    assert store.order_end(key, turn.token, 1_000_000, 60.0)
    assert loyalty.send("gold", 2000, id="evt_busy") == 200
    assert loyalty.applied == [("gold", 2000)]


def test_a_stale_event_is_signalled_and_logged(
    make_loyalty: Make, caplog: pytest.LogCaptureFixture
) -> None:
    loyalty = make_loyalty("memory")
    assert loyalty.send("gold", 2000) == 200
    seen: list[dict[str, t.Any]] = []

    def record(sender: Flask, **kwargs: t.Any) -> None:
        seen.append({"sender": sender, **kwargs})

    with (
        signals.handler_skipped_stale.connected_to(record),
        caplog.at_level(logging.INFO, "flask_ploints"),
    ):
        assert loyalty.send("silver", 1000, id="evt_old") == 200
    [sent] = seen
    assert sent["sender"] is loyalty.app
    assert sent["name"] == "ploints"
    assert sent["event"].id == "evt_old"
    assert sent["handler"] == "tests.ordering_app.Loyalty.tier"
    assert sent["key"] == EMAIL
    assert sent["newer"] == stamp(2000)
    [record_] = [r for r in caplog.records if "stale" in r.getMessage()]
    assert record_.getMessage() == (
        "event 'evt_old' ('customer.tier_changed') skipped by handler"
        " 'tests.ordering_app.Loyalty.tier': stale for key 'jane@example.com'"
        f" ({stamp(2000).isoformat()} applied)"
    )


def test_a_given_name_is_the_handlers_identity() -> None:
    webhooks = PlointsWebhooks()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": "memory"}, webhooks)
    applied: list[str] = []

    def first(event: Event) -> None:
        applied.append("first " + event.id)

    def renamed(event: Event) -> None:
        applied.append("renamed " + event.id)

    key = (lambda e: e.data["customerEmail"],)[0]
    webhooks.on("customer.tier_changed", latest_by=key, name="tier")(first)
    client = PlointsClient(app)
    data = {"customerEmail": EMAIL, "previousTier": "bronze", "newTier": "gold"}
    client.send("customer.tier_changed", data, id="evt_new", timestamp=stamp(2000))
    # Same name, another function: the same order.
    webhooks.handlers._by_type["customer.tier_changed"].clear()
    webhooks.on("customer.tier_changed", latest_by=key, name="tier")(renamed)
    client.send("customer.tier_changed", data, id="evt_old", timestamp=stamp(1000))
    assert applied == ["first evt_new"]


@pytest.mark.parametrize("store", [None, "tests.test_ordering:plain_store"])
def test_a_store_without_order_refuses_latest_by(store: str | None) -> None:
    webhooks = PlointsWebhooks()
    app = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)[0]
    message = (
        "PLOINTS_DEDUPE_STORE: latest_by needs a store that keeps the newest event applied per"
        " key (memory, Redis, SQL or db); {} does not"
    )
    name = "NullStore" if store is None else "Plain"
    # Registered after init_app: refused at registration.
    with pytest.raises(ConfigError) as caught:
        webhooks.on("customer.tier_changed", latest_by=lambda e: e.id)
    assert str(caught.value) == message.format(name)
    assert app.name == "ploints_test"
    # Registered before init_app: refused by init_app.
    early = PlointsWebhooks()
    early.on("customer.tier_changed", latest_by=lambda e: e.id)(lambda e: None)
    with pytest.raises(ConfigError) as caught:
        build_app({"PLOINTS_DEDUPE_STORE": store}, early)
    assert str(caught.value) == message.format(name)


def test_name_goes_with_latest_by() -> None:
    with pytest.raises(ValueError) as caught:
        PlointsWebhooks().on("customer.tier_changed", name="tier")
    assert str(caught.value) == "name= names a handler's order, and goes with latest_by="


class Plain:
    """A custom store with the dedupe methods only."""

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> t.Any:
        raise NotImplementedError

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        raise NotImplementedError

    def release(self, event_id: str, token: str) -> bool:
        raise NotImplementedError

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        raise NotImplementedError

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        raise NotImplementedError


def plain_store(config: t.Mapping[str, t.Any]) -> Plain:
    return Plain()


def _tier_app(config: dict[str, t.Any]) -> tuple[Flask, PlointsClient]:
    webhooks = PlointsWebhooks()

    @webhooks.on("customer.tier_changed", latest_by=lambda e: e.data["customerEmail"], name="tier")
    def tier(event: Event) -> None:
        pass

    app, _ = build_app({"PLOINTS_DEDUPE_STORE": "memory", **config}, webhooks)
    return app, PlointsClient(app)


def _change(client: PlointsClient, seconds: int, id: str) -> int:
    data = {"customerEmail": EMAIL, "previousTier": "bronze", "newTier": "gold"}
    response = client.send("customer.tier_changed", data, id=id, timestamp=stamp(seconds))
    return response.status_code


def test_a_stale_event_is_counted() -> None:
    from prometheus_client import CollectorRegistry

    from flask_ploints.metrics import Metrics

    registry = CollectorRegistry()
    _, client = _tier_app({"PLOINTS_METRICS": Metrics(registry)})
    assert [_change(client, s, f"evt_{s}") for s in (2000, 1000, 1500, 3000)] == [200] * 4
    labels = {"type": "customer.tier_changed", "handler": "tier"}
    assert registry.get_sample_value("ploints_handler_stale_total", labels) == 2
    processed = {"type": "customer.tier_changed", "outcome": "processed"}
    assert registry.get_sample_value("ploints_deliveries_total", processed) == 4


def test_a_stale_event_marks_its_handler_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, client = _tier_app({"PLOINTS_OPENTELEMETRY": provider})
    assert _change(client, 2000, "evt_new") == 200
    assert _change(client, 1000, "evt_old") == 200
    handler_spans = [
        span for span in exporter.get_finished_spans() if span.name.endswith("<locals>.tier")
    ]
    assert [dict(span.attributes or {}).get("ploints.stale") for span in handler_spans] == [
        None,
        True,
    ]
    attributes = dict(handler_spans[1].attributes or {})
    assert attributes["ploints.stale.key"] == EMAIL
    assert attributes["ploints.stale.newer"] == stamp(2000).isoformat()
    provider.shutdown()


def test_a_delivery_with_latest_by_on_db_takes_its_turn_in_its_claim_on_postgresql(
    make_loyalty: Make, unique: str
) -> None:
    loyalty = make_loyalty("db-postgresql")
    assert loyalty.db is not None
    # Of the session's engine: the handlers' transaction.
    statements: list[str] = []
    with loyalty.app.app_context():
        sa.event.listen(
            loyalty.db.engine, "before_cursor_execute", lambda *args: statements.append(args[2])
        )
    # New, stale, a tie.
    assert [loyalty.send(*sent) for sent in [("gold", 2000), ("silver", 1000), ("gold", 2000)]] == [
        200,
        200,
        200,
    ]
    assert loyalty.applied == [("gold", 2000), ("gold", 2000)]
    assert loyalty.committed() == ("gold", [2000, 2000])
    # Each claim took the key's turn, and nothing else wrote it (the table
    # was made on first use).
    order = f" {unique}_order "
    turns = [s for s in statements if order in s and not s.lstrip().startswith("CREATE")]
    assert [(s.split()[:3], "advanced AS" in s) for s in turns] == [
        (["WITH", "lock_wait", "AS"], True)
    ] * 3


def test_a_key_locked_by_another_transaction_answers_409_with_db_on_postgresql(
    make_loyalty: Make, unique: str
) -> None:
    loyalty = make_loyalty("db-postgresql", PLOINTS_SQL_TIMEOUT=0.5)
    assert loyalty.db is not None
    assert loyalty.send("silver", 1000) == 200
    with loyalty.app.app_context(), loyalty.db.engine.connect() as connection:
        # Another delivery's transaction, holding the key's row.
        connection.execute(sa.text(f"SELECT 1 FROM {unique}_order FOR UPDATE"))
        started = time.monotonic()
        status = loyalty.send("gold", 2000, id="evt_busy")
        waited = time.monotonic() - started
        connection.rollback()
    assert status == 409
    assert 0.5 <= waited < 2
    assert loyalty.applied == [("silver", 1000)]
    # Rolled back: the retry runs.
    assert loyalty.send("gold", 2000, id="evt_busy") == 200
    assert loyalty.committed() == ("gold", [1000, 2000])
