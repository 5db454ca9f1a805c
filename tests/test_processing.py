"""The processing core (flask_ploints/_processing.py): one claim, run and
settle path for deliveries, re-runs and workers, the handler scopes, and
what counts as a handler failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import typing as t

import pytest
from flask import Flask

from flask_ploints import ConfigError
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import signals
from flask_ploints._dispatch import SyncDispatcher
from flask_ploints._events import parse_event
from flask_ploints._processing import Outcome
from flask_ploints._state import receiver_for
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import rerun
from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import EventState
from flask_ploints.stores import HandlerScope
from flask_ploints.stores import MemoryStore
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .support import build_app


class ScopedStore(MemoryStore):
    """A memory store that wraps the handlers, as a transactional store
    would, and records what its scope saw.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, str | None]] = []

    @contextlib.contextmanager
    def handler_scope(self, event: Event) -> t.Iterator[None]:
        self.seen.append(("enter", event.id, None))
        try:
            yield
        except BaseException as exc:
            self.seen.append(("exit", event.id, type(exc).__name__))
            raise
        self.seen.append(("exit", event.id, None))


class ScopedDispatcher(SyncDispatcher):
    def __init__(self, webhooks: PlointsWebhooks, seen: list[str]) -> None:
        super().__init__(webhooks.handlers, 30.0)
        self.seen = seen

    @contextlib.contextmanager
    def handler_scope(self, event: Event) -> t.Iterator[None]:
        self.seen.append(f"dispatcher enter {event.id}")
        yield
        self.seen.append(f"dispatcher exit {event.id}")


def _event(event_id: str = "evt_1") -> Event:
    return parse_event(json.dumps(build_event("points.earned", id=event_id)).encode())


def test_a_scoped_store_is_a_handler_scope() -> None:
    assert isinstance(ScopedStore(), HandlerScope)
    assert not isinstance(MemoryStore(), HandlerScope)


def test_the_store_scope_wraps_the_handlers_of_a_delivery(webhooks: PlointsWebhooks) -> None:
    store = ScopedStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)

    @webhooks.on("points.earned")
    def handle(event: Event) -> None:
        store.seen.append(("handler", event.id, None))

    assert PlointsClient(app).send("points.earned", id="evt_1").status_code == 200
    assert store.seen == [
        ("enter", "evt_1", None),
        ("handler", "evt_1", None),
        ("exit", "evt_1", None),
    ]
    assert store.claim("evt_1", 60).status is ClaimStatus.DONE


def test_the_scope_sees_the_failure_before_the_claim_is_released(
    webhooks: PlointsWebhooks,
) -> None:
    store = ScopedStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)

    @webhooks.on("points.earned")
    def handle(event: Event) -> None:
        # The claim is still held while the scope is open.
        assert store.claim(event.id, 60).status is ClaimStatus.IN_FLIGHT
        raise ValueError("boom")

    response = PlointsClient(app).send("points.earned", id="evt_1")
    assert (response.status_code, response.get_json()) == (500, {"error": "handler failed"})
    assert store.seen == [("enter", "evt_1", None), ("exit", "evt_1", "ValueError")]
    assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED


def test_the_dispatcher_scope_wraps_the_handlers_too(webhooks: PlointsWebhooks) -> None:
    seen: list[str] = []
    app, _ = build_app({"PLOINTS_DISPATCH": ScopedDispatcher(webhooks, seen)}, webhooks)
    webhooks.on("points.earned")(lambda event: seen.append(f"handler {event.id}"))

    assert PlointsClient(app).send("points.earned", id="evt_1").status_code == 200
    assert seen == ["dispatcher enter evt_1", "handler evt_1", "dispatcher exit evt_1"]


def test_a_rerun_goes_through_the_same_scope(webhooks: PlointsWebhooks) -> None:
    store = ScopedStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)
    webhooks.on("points.earned")(lambda event: None)

    body = json.dumps(build_event("points.earned", id="evt_1")).encode()
    assert rerun(app, body) is ReplayOutcome.PROCESSED
    assert store.seen == [("enter", "evt_1", None), ("exit", "evt_1", None)]


def test_a_cancelled_async_handler_is_a_handler_failure(
    webhooks: PlointsWebhooks, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)
    failures: list[dict[str, t.Any]] = []

    @webhooks.on("points.earned")
    async def handle(event: Event) -> None:
        raise asyncio.CancelledError

    def failed(sender: Flask, **kwargs: t.Any) -> None:
        failures.append(kwargs)

    with signals.handler_failed.connected_to(failed, sender=app):
        response = PlointsClient(app).send("points.earned", id="evt_1")
    assert (response.status_code, response.get_json()) == (500, {"error": "handler failed"})
    assert [type(kwargs["exception"]) for kwargs in failures] == [asyncio.CancelledError]
    assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
    assert (
        "event 'evt_1' ('points.earned') failed: a handler raised CancelledError()" in caplog.text
    )


def test_a_process_exit_releases_the_claim_and_goes_on(webhooks: PlointsWebhooks) -> None:
    store = MemoryStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)

    @webhooks.on("points.earned")
    def handle(event: Event) -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        PlointsClient(app).send("points.earned", id="evt_1")
    assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED


def test_resume_runs_a_queued_event_on_its_claim(webhooks: PlointsWebhooks) -> None:
    store = MemoryStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)
    ran: list[str] = []
    webhooks.on("points.earned")(lambda event: ran.append(event.id))
    processor = receiver_for(app).processor
    claim = store.claim("evt_1", 60)

    with app.app_context():
        result = processor.resume(app, _event("evt_1"), claim.token)
        again = processor.resume(app, _event("evt_1"), claim.token)
    assert (result.outcome, again.outcome) == (Outcome.PROCESSED, Outcome.DUPLICATE)
    assert ran == ["evt_1"]
    stored = store.get("evt_1")
    assert stored is not None and stored.status is EventState.DONE


def test_resume_takes_a_lapsed_claim_again(webhooks: PlointsWebhooks) -> None:
    store = MemoryStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)
    webhooks.on("points.earned")(lambda event: None)
    processor = receiver_for(app).processor

    with app.app_context():
        result = processor.resume(app, _event("evt_1"), "a-token-that-lapsed")
    assert result.outcome is Outcome.PROCESSED
    assert store.claim("evt_1", 60).status is ClaimStatus.DONE


def test_resume_skips_an_event_held_by_another_delivery(webhooks: PlointsWebhooks) -> None:
    store = MemoryStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)
    ran: list[str] = []
    webhooks.on("points.earned")(lambda event: ran.append(event.id))
    store.claim("evt_1", 60)

    with app.app_context():
        result = receiver_for(app).processor.resume(app, _event("evt_1"), "not-the-holder")
    assert (result.outcome, ran) == (Outcome.IN_FLIGHT, [])


def test_a_failed_worker_attempt_keeps_the_claim_until_it_gives_up(
    webhooks: PlointsWebhooks,
) -> None:
    store = MemoryStore()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, webhooks)
    processor = receiver_for(app).processor
    failures: list[dict[str, t.Any]] = []

    @webhooks.on("points.earned")
    def handle(event: Event) -> None:
        raise ValueError("boom")

    def failed(sender: Flask, **kwargs: t.Any) -> None:
        failures.append(kwargs)

    claim = store.claim("evt_1", 60)
    event = _event("evt_1")
    with app.app_context(), signals.handler_failed.connected_to(failed, sender=app):
        result = processor.resume(app, event, claim.token)
        assert (result.outcome, result.token, type(result.error)) == (
            Outcome.FAILED,
            claim.token,
            ValueError,
        )
        assert failures == []
        assert store.claim("evt_1", 60).status is ClaimStatus.IN_FLIGHT
        assert processor.keep(event, claim.token) is True
        assert result.error is not None
        recorded = processor.give_up(
            app, event, claim.token, result.error, attempts=6, handlers_ran=True, note="\nlast"
        )
    assert recorded is True
    stored = store.get("evt_1")
    assert stored is not None and stored.status is EventState.FAILED
    assert stored.error is not None and stored.error.endswith("ValueError: boom\n\nlast")
    assert [
        (kwargs["name"], kwargs["event"], type(kwargs["exception"])) for kwargs in failures
    ] == [("ploints", event, ValueError)]


def _two_accounts(
    store: object, **partner: t.Any
) -> tuple[Flask, PlointsWebhooks, PlointsWebhooks]:
    """The documented two-account setup: two instances on one app and one
    store.
    """
    main = PlointsWebhooks()
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, main)
    other = PlointsWebhooks(app, name="partner", url="/partner", secret="whsec_partner", **partner)
    return app, main, other


def _send(app: Flask, name: str, event_id: str) -> int:
    return PlointsClient(app, name).send("points.earned", id=event_id).status_code


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_instances_sharing_a_store_keep_their_ids_apart(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> None:
    store: object = MemoryStore()
    if kind == "redis":
        store = request.getfixturevalue("redis_url")
    config = {"redis_prefix": f"{unique}:"} if kind == "redis" else {}
    main = PlointsWebhooks(**config)
    app, _ = build_app({"PLOINTS_DEDUPE_STORE": store}, main)
    partner = PlointsWebhooks(app, name="partner", url="/partner", secret="whsec_partner", **config)
    seen: list[tuple[str, str]] = []
    main.on_any(lambda event: seen.append(("ploints", event.id)))
    partner.on_any(lambda event: seen.append(("partner", event.id)))

    assert [_send(app, "partner", "evt_X"), _send(app, "ploints", "evt_X")] == [200, 200]
    assert [_send(app, "partner", "evt_X"), _send(app, "ploints", "evt_X")] == [200, 200]
    assert seen == [("partner", "evt_X"), ("ploints", "evt_X")]
    if kind == "redis":
        receiver_for(app).store.client.delete(  # type: ignore[attr-defined]
            f"{unique}:evt_X", f"{unique}:partner\x1fevt_X"
        )


def test_one_account_cannot_spell_another_accounts_key() -> None:
    app, _, partner = _two_accounts(MemoryStore())
    ran: list[str] = []
    partner.on_any(lambda event: ran.append(event.id))
    # Whoever holds the main secret signs ids of their choosing; none of
    # them reaches the partner's keys.
    assert _send(app, "ploints", "partner:evt_X") == 200
    assert _send(app, "ploints", "partner\x1fevt_X") == 400
    assert _send(app, "partner", "evt_X") == 200
    assert ran == ["evt_X"]


def test_keys_of_the_default_and_other_instances() -> None:
    app, _, _ = _two_accounts(MemoryStore())
    main = receiver_for(app).processor.namespace
    partner = receiver_for(app, "partner").processor.namespace
    assert (main.key("evt_1"), partner.key("evt_1")) == ("evt_1", "partner\x1fevt_1")
    assert (main.event_id("evt_1"), partner.event_id("partner\x1fevt_1")) == ("evt_1", "evt_1")
    assert (main.event_id("partner\x1fevt_1"), partner.event_id("evt_1")) == (None, None)
    long_id = "e" * 255
    assert partner.key(long_id) == "partner\x1f#" + hashlib.sha256(long_id.encode()).hexdigest()
    assert len(partner.key(long_id)) <= 255
    assert main.key(long_id) == long_id


def test_the_namespace_can_be_set_or_turned_off() -> None:
    app, _, _ = _two_accounts(MemoryStore(), namespace="")
    assert receiver_for(app, "partner").processor.namespace.key("evt_1") == "evt_1"
    other, _, _ = _two_accounts(MemoryStore(), namespace="acme")
    assert receiver_for(other, "partner").processor.namespace.key("evt_1") == "acme\x1fevt_1"


@pytest.mark.parametrize("namespace", ["a\x1fb", "n" * 65, 7])
def test_a_bad_namespace_names_the_key(namespace: object) -> None:
    with pytest.raises(ConfigError, match=r"^PLOINTS_DEDUPE_NAMESPACE"):
        _two_accounts(MemoryStore(), namespace=namespace)
