from __future__ import annotations

import time

import pytest

from flask_ploints.stores import ClaimStatus
from flask_ploints.stores import InspectableStore
from flask_ploints.stores import MemoryStore
from flask_ploints.stores import NullStore
from flask_ploints.testing import FakeClock
from flask_ploints.testing import InspectableStoreContract


class TestMemoryStore(InspectableStoreContract):
    @pytest.fixture
    def store(self, clock: FakeClock) -> MemoryStore:
        return MemoryStore(clock=clock)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_memory_store_is_bounded_oldest_first() -> None:
    store = MemoryStore(max_entries=3)
    for number in range(5):
        claim = store.claim(f"evt_{number}", 60)
        store.commit(f"evt_{number}", claim.token, 3600)
    assert len(store) == 3
    assert store.claim("evt_0", 60).status is ClaimStatus.CLAIMED
    assert store.claim("evt_4", 60).status is ClaimStatus.DONE


def test_memory_store_drops_expired_entries_as_it_goes() -> None:
    clock = _Clock()
    store = MemoryStore(clock=clock)
    for number in range(10):
        claim = store.claim(f"evt_{number}", 60)
        store.commit(f"evt_{number}", claim.token, 100)
    clock.now = 200
    for number in range(10, 20):
        store.claim(f"evt_{number}", 60)
    assert len(store) == 10


def test_memory_store_keeps_the_error_of_a_failed_event() -> None:
    store = MemoryStore()
    claim = store.claim("evt_1", 60)
    store.fail("evt_1", claim.token, "Traceback: boom", 3600)
    stored = store.get("evt_1")
    assert stored is not None
    assert (stored.id, stored.status, stored.attempts) == ("evt_1", "failed", 1)
    assert stored.error == "Traceback: boom"
    assert stored.payload is None
    assert stored.updated_at == pytest.approx(time.time(), abs=5)
    assert store.get("evt_2") is None


def test_memory_store_is_inspectable() -> None:
    clock = _Clock()
    store = MemoryStore(clock=clock)
    assert isinstance(store, InspectableStore)
    for number in range(3):
        claim = store.claim(f"evt_{number}", 60, b"{}")
        store.fail(f"evt_{number}", claim.token, f"boom {number}", 100)
    again = store.claim("evt_1", 60)
    assert again.status is ClaimStatus.CLAIMED
    in_flight = store.get("evt_1")
    assert in_flight is not None
    assert (in_flight.status, in_flight.attempts, in_flight.error) == ("in_flight", 2, "boom 1")
    done = store.claim("evt_3", 60)
    store.commit("evt_3", done.token, 100)
    assert [event.id for event in store.failed()] == ["evt_2", "evt_0"]
    assert [event.id for event in store.failed(limit=1)] == ["evt_2"]
    clock.now = 100
    assert store.failed() == []
    assert store.get("evt_0") is None
    assert store.claim("evt_0", 60).status is ClaimStatus.CLAIMED
    fresh = store.get("evt_0")
    assert fresh is not None
    assert (fresh.attempts, fresh.error) == (1, None)


def test_memory_store_refuses_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_entries must be at least 1"):
        MemoryStore(max_entries=0)


def test_null_store_claims_every_delivery() -> None:
    store = NullStore()
    first = store.claim("evt_1", 60)
    assert first.status is ClaimStatus.CLAIMED
    assert store.commit("evt_1", first.token, 3600) is True
    assert store.claim("evt_1", 60).status is ClaimStatus.CLAIMED
    assert store.release("evt_1", first.token) is True
    assert store.extend("evt_1", first.token, 60) is True
    assert store.fail("evt_1", first.token, "boom", 60) is True
