"""Helpers for testing the handlers of an app that uses flask-ploints.

They work without pytest. With pytest, the plugin installed with the
package (:mod:`flask_ploints.pytest_plugin`) adds a fixture: with an
``app`` fixture in your ``conftest.py`` (as pytest-flask expects), the
``ploints_client`` fixture posts correctly signed events to it::

    def test_award(ploints_client):
        response = ploints_client.send("points.earned", {"amount": 5}, id="evt_1")
        assert response.status_code == 200

:class:`StoreContract` is the test suite every dedupe store must pass;
subclass it with a ``store`` fixture to check your own store
(:class:`InspectableStoreContract` for one that can list failed events).
"""

from __future__ import annotations

import json
import threading
import time
import typing as t

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from ._samples import build_event
from ._signature import SIGNATURE_HEADER
from ._signature import sign
from ._state import delivery_target
from ._state import delivery_url
from ._state import receiver_for
from .stores import ClaimStatus
from .stores import DedupeStore
from .stores import InspectableStore

if t.TYPE_CHECKING:
    from pytest import fixture as _fixture
else:
    try:
        from pytest import fixture as _fixture
    except ImportError:
        # The helpers need no pytest; the contracts, test classes, only
        # ever run under it.
        def _fixture(func):
            return func


__all__ = [
    "FakeClock",
    "InspectableStoreContract",
    "PlointsClient",
    "StoreContract",
    "build_event",
    "send_event",
]


class PlointsClient:
    """Posts signed events to one :class:`~flask_ploints.PlointsWebhooks`
    endpoint of ``app`` through ``app.test_client()``.

    :param app: an app the extension is registered on.
    :param name: which instance, when the app has several.
    """

    def __init__(self, app: Flask, name: str = "ploints") -> None:
        self.app = app
        self.receiver = receiver_for(app, name)
        settings = self.receiver.settings
        self.client: FlaskClient = app.test_client()
        #: The endpoint's URL rule; ``/webhooks/ploints/<account>`` on an
        #: endpoint for many accounts, whose posts name the account.
        self.url: str = settings.url
        #: The current secret; ``None`` on an endpoint for many accounts,
        #: where each post is signed with its account's, from the lookup.
        self.secret: str | None = settings.secrets[0] if settings.accounts is None else None

    def send(
        self,
        type: str,
        data: t.Mapping[str, t.Any] | None = None,
        *,
        id: str | None = None,
        timestamp: t.Any = None,
        account: str | None = None,
    ) -> TestResponse:
        """Build an event with :func:`build_event`, sign it with the current
        secret and post it.

        :param account: on an endpoint for many accounts, the account to
            post for (see :meth:`post`).

        .. versionchanged:: 0.2
            The ``account`` parameter.
        """
        return self.post(build_event(type, data, id=id, timestamp=timestamp), account=account)

    def post(
        self,
        event: t.Mapping[str, t.Any] | bytes,
        *,
        signature: str | None = None,
        headers: t.Mapping[str, str] | None = None,
        account: str | None = None,
    ) -> TestResponse:
        """Post an event body, signed with the current secret unless
        ``signature`` is given.

        :param event: a body dict (serialised as JSON) or the exact bytes.
        :param signature: the header value to send instead of the right one.
        :param headers: more headers; they win over the defaults.
        :param account: on an endpoint for many accounts, the account whose
            URL it is posted to and whose current secret (from the app's
            lookup, called once) signs it.
        :raises ValueError: ``account`` is missing on an endpoint for many
            accounts, given on one for one, or unknown to the lookup.

        .. versionchanged:: 0.2
            The ``account`` parameter.
        """
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        if signature is not None:
            # A given signature needs no secret, nor a lookup of one.
            url = delivery_url(self.app, self.receiver, account)
        elif account is None and self.secret is not None:
            url, signature = self.url, sign(body, self.secret)
        else:
            url, secret = delivery_target(self.app, self.receiver, account)
            signature = sign(body, secret)
        sent = {"Content-Type": "application/json", SIGNATURE_HEADER: signature}
        sent.update(headers or {})
        return self.client.post(url, data=body, headers=sent)


def send_event(
    app: Flask,
    type: str,
    data: t.Mapping[str, t.Any] | None = None,
    *,
    id: str | None = None,
    name: str = "ploints",
    account: str | None = None,
) -> TestResponse:
    """Post one correctly signed event to ``app`` and return the response.

    :param app: an app the extension is registered on.
    :param type: the event type.
    :param data: the payload; default, sample data for the type.
    :param id: the event id; default, a fresh one.
    :param name: which instance, when the app has several.
    :param account: the account to post for, on an endpoint for many
        accounts (see :meth:`PlointsClient.post`).

    .. versionchanged:: 0.2
        The ``account`` parameter.
    """
    return PlointsClient(app, name).send(type, data, id=id, account=account)


class FakeClock:
    """A clock in seconds since the epoch that moves only when told, for the
    ``clock`` argument of a store under test.

    :param start: its first reading; default, the current time.

    .. versionadded:: 0.2
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        self.now += seconds


class StoreContract:
    """The behaviour every dedupe store must show, as a pytest test class.

    Subclass it in a test module and provide a ``store`` fixture that returns
    a fresh, empty store::

        class TestMyStore(StoreContract):
            @pytest.fixture
            def store(self):
                return MyStore(...)

    Time passes in the tests through :meth:`advance`. A store that takes a
    clock gets the :meth:`clock` fixture, and time then passes at once::

            @pytest.fixture
            def store(self, clock):
                return MyStore(..., clock=clock)

    Otherwise the tests sleep past short leases, so the store must honour
    leases and retentions with a precision of about 100 ms.
    """

    #: Seconds used as a lease or retention that runs out during a test.
    short = 0.4
    #: Seconds used as a lease or retention that does not.
    long = 60.0

    @_fixture
    def clock(self) -> FakeClock:
        """A :class:`FakeClock` for the ``store`` fixture to give its store;
        :meth:`advance` then moves it instead of sleeping.
        """
        self._clock = FakeClock()
        return self._clock

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store: move the :meth:`clock` when
        the ``store`` fixture took it, else sleep. Override it for a store
        whose time also runs somewhere else (a server's key expiry).
        """
        clock: FakeClock | None = self.__dict__.get("_clock")
        if clock is None:
            time.sleep(seconds)
        else:
            clock.advance(seconds)

    def _expire(self) -> None:
        self.advance(self.short + 0.3)

    def test_first_claim_owns_the_id(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.long)
        assert claim.status is ClaimStatus.CLAIMED
        assert claim.token

    def test_claim_accepts_the_payload(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.long, b'{"id": "evt_1"}')
        assert claim.status is ClaimStatus.CLAIMED
        assert store.commit("evt_1", claim.token, self.long) is True

    def test_second_claim_sees_the_lease(self, store: DedupeStore) -> None:
        store.claim("evt_1", self.long)
        claim = store.claim("evt_1", self.long)
        assert claim.status is ClaimStatus.IN_FLIGHT
        assert claim.token == ""
        assert 0 <= claim.retry_after <= self.long

    def test_ids_are_independent(self, store: DedupeStore) -> None:
        store.claim("evt_1", self.long)
        assert store.claim("evt_2", self.long).status is ClaimStatus.CLAIMED

    def test_commit_makes_a_duplicate(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.long)
        assert store.commit("evt_1", claim.token, self.long) is True
        assert store.claim("evt_1", self.long).status is ClaimStatus.DONE

    def test_commit_with_a_wrong_token_changes_nothing(self, store: DedupeStore) -> None:
        store.claim("evt_1", self.long)
        assert store.commit("evt_1", "not-the-token", self.long) is False
        assert store.claim("evt_1", self.long).status is ClaimStatus.IN_FLIGHT

    def test_commit_of_an_unclaimed_id_is_refused(self, store: DedupeStore) -> None:
        assert store.commit("evt_1", "token", self.long) is False
        assert store.claim("evt_1", self.long).status is ClaimStatus.CLAIMED

    def test_release_lets_the_next_delivery_claim(self, store: DedupeStore) -> None:
        first = store.claim("evt_1", self.long)
        assert store.release("evt_1", first.token) is True
        second = store.claim("evt_1", self.long)
        assert second.status is ClaimStatus.CLAIMED
        assert second.token != first.token

    def test_release_with_a_wrong_token_changes_nothing(self, store: DedupeStore) -> None:
        store.claim("evt_1", self.long)
        assert store.release("evt_1", "not-the-token") is False
        assert store.claim("evt_1", self.long).status is ClaimStatus.IN_FLIGHT

    def test_release_after_commit_is_refused(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.long)
        store.commit("evt_1", claim.token, self.long)
        assert store.release("evt_1", claim.token) is False
        assert store.claim("evt_1", self.long).status is ClaimStatus.DONE

    def test_expired_lease_can_be_claimed_again(self, store: DedupeStore) -> None:
        first = store.claim("evt_1", self.short)
        self._expire()
        second = store.claim("evt_1", self.long)
        assert second.status is ClaimStatus.CLAIMED
        assert store.commit("evt_1", first.token, self.long) is False
        assert store.release("evt_1", first.token) is False
        assert store.commit("evt_1", second.token, self.long) is True

    def test_done_is_forgotten_after_retention(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.long)
        store.commit("evt_1", claim.token, self.short)
        self._expire()
        assert store.claim("evt_1", self.long).status is ClaimStatus.CLAIMED

    def test_extend_keeps_the_lease(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.short)
        assert store.extend("evt_1", claim.token, self.long) is True
        self._expire()
        assert store.claim("evt_1", self.long).status is ClaimStatus.IN_FLIGHT
        assert store.commit("evt_1", claim.token, self.long) is True

    def test_extend_with_a_wrong_token_is_refused(self, store: DedupeStore) -> None:
        store.claim("evt_1", self.short)
        assert store.extend("evt_1", "not-the-token", self.long) is False
        self._expire()
        assert store.claim("evt_1", self.long).status is ClaimStatus.CLAIMED

    def test_failed_event_can_be_claimed_again(self, store: DedupeStore) -> None:
        claim = store.claim("evt_1", self.long)
        assert store.fail("evt_1", claim.token, "Traceback: boom", self.long) is True
        assert store.claim("evt_1", self.long).status is ClaimStatus.CLAIMED

    def test_fail_with_a_wrong_token_is_refused(self, store: DedupeStore) -> None:
        store.claim("evt_1", self.long)
        assert store.fail("evt_1", "not-the-token", "boom", self.long) is False
        assert store.claim("evt_1", self.long).status is ClaimStatus.IN_FLIGHT

    def test_unusual_ids_are_kept_apart(self, store: DedupeStore) -> None:
        ids = ["evt:1", "evt 1", "évènement-1", "evt_1*", "x" * 255, "evt_1\\", "'evt_1'"]
        for event_id in ids:
            claim = store.claim(event_id, self.long)
            assert claim.status is ClaimStatus.CLAIMED, event_id
            assert store.commit(event_id, claim.token, self.long) is True
        assert store.claim("evt_1", self.long).status is ClaimStatus.CLAIMED

    def test_one_of_many_concurrent_claims_wins(self, store: DedupeStore) -> None:
        barrier = threading.Barrier(16)
        statuses: list[ClaimStatus] = []

        def claim() -> None:
            barrier.wait()
            statuses.append(store.claim("evt_1", self.long).status)

        threads = [threading.Thread(target=claim) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses.count(ClaimStatus.CLAIMED) == 1
        assert statuses.count(ClaimStatus.IN_FLIGHT) == 15


class InspectableStoreContract(StoreContract):
    """:class:`StoreContract`, plus what a store that implements
    :class:`~flask_ploints.stores.InspectableStore` must show: ``get`` and
    ``failed`` report ids, statuses, attempts and errors. Subclass it the
    same way.
    """

    def test_get_reports_the_state_of_an_id(self, store: DedupeStore) -> None:
        assert isinstance(store, InspectableStore)
        assert store.get("evt_unknown") is None
        first = store.claim("evt_1", self.long)
        store.fail("evt_1", first.token, "boom 1", self.long)
        again = store.claim("evt_1", self.long)
        stored = store.get("evt_1")
        assert stored is not None
        assert (stored.id, stored.status, stored.attempts, stored.error) == (
            "evt_1",
            "in_flight",
            2,
            "boom 1",
        )
        import pytest

        assert stored.updated_at == pytest.approx(time.time(), abs=5)
        store.commit("evt_1", again.token, self.long)
        done = store.get("evt_1")
        assert done is not None
        assert (done.status, done.attempts) == ("done", 2)

    def test_fail_records_the_attempts_it_is_given(self, store: DedupeStore) -> None:
        assert isinstance(store, InspectableStore)
        claim = store.claim("evt_1", self.long)
        assert store.fail("evt_1", claim.token, "boom", self.long, attempts=6) is True
        stored = store.get("evt_1")
        assert stored is not None
        assert (stored.status, stored.attempts) == ("failed", 6)

    def test_failed_lists_the_newest_first(self, store: DedupeStore) -> None:
        assert isinstance(store, InspectableStore)
        for number in range(3):
            claim = store.claim(f"evt_{number}", self.long)
            store.fail(f"evt_{number}", claim.token, f"boom {number}", self.long)
            # Some stores keep times to the millisecond.
            self.advance(0.01)
        done = store.claim("evt_done", self.long)
        store.commit("evt_done", done.token, self.long)
        again = store.claim("evt_1", self.long)
        store.fail("evt_1", again.token, "boom again", self.long)

        failed = store.failed()
        assert [(event.id, event.error, event.attempts) for event in failed] == [
            ("evt_1", "boom again", 2),
            ("evt_2", "boom 2", 1),
            ("evt_0", "boom 0", 1),
        ]
        assert {event.status for event in failed} == {"failed"}
        assert [event.id for event in store.failed(limit=2)] == ["evt_1", "evt_2"]
