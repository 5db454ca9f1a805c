"""A dedupe store in this process's memory."""

from __future__ import annotations

import itertools
import threading
import time
import typing as t
from collections import deque

from .._ordering import Turn
from .._ordering import TurnEnd
from .._ordering import TurnStatus
from ._base import Claim
from ._base import ClaimStatus
from ._base import EventState
from ._base import StoredEvent

__all__ = ["MemoryStore", "NullStore"]

_CLAIMED = Claim(ClaimStatus.CLAIMED)
_DONE = Claim(ClaimStatus.DONE)


class _Entry:
    """One id's state, changed in place as its claim is settled."""

    __slots__ = ("attempts", "error", "expires", "status", "token", "updated")

    def __init__(
        self,
        token: str,
        expires: float,
        updated: float,
        attempts: int = 1,
        error: str | None = None,
    ) -> None:
        self.status = EventState.IN_FLIGHT
        self.token = token
        self.expires = expires
        self.updated = updated
        self.attempts = attempts
        self.error = error


class MemoryStore:
    """Remembers event ids in a dict guarded by a lock.

    **Per process.** Each worker process has its own memory, so with several
    gunicorn workers or hosts a retry that lands on another worker is
    processed again. Use it for development, tests and single-process
    deployments; use the Redis or SQL store in production. The extension warns
    at start-up when it is used outside testing.

    The store is bounded: past ``max_entries`` ids, the oldest claimed are
    forgotten first, whatever their retention. Size the bound above the
    number of events you receive in a retention period.

    It implements :class:`.InspectableStore`; payloads are not kept, so
    :attr:`.StoredEvent.payload` is always ``None``.

    :param max_entries: the most ids remembered at once.
    :param clock: a monotonic clock in seconds; tests may pass their own.
    """

    #: Expired entries are looked for once every this many claims.
    _SWEEP_EVERY = 16

    def __init__(
        self,
        max_entries: int = 100_000,
        *,
        clock: t.Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        # Wall time is only shown by get(); derived from the one clock read.
        self._wall_offset = time.time() - clock()
        self._entries: dict[str, _Entry] = {}
        # Claim order, for eviction and expiry; an entry replaced by a later
        # claim of its id stays here until it reaches the front, and is then
        # skipped because it is no longer the id's entry.
        self._order: deque[tuple[str, _Entry]] = deque()
        # Tokens only need to be unique within this store.
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        # latest_by's state: key -> [newest ms or None, remembered until,
        # holder's token or "", holder's turn ends].
        self._orders: dict[str, list[t.Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. The payload is not kept."""
        with self._lock:
            return self._claim(event_id, lease, self._clock())

    def _claim(self, event_id: str, lease: float, now: float) -> Claim:
        entry = self._entries.get(event_id)
        attempts = 1
        error = None
        if entry is not None:
            if entry.expires > now:
                if entry.status is EventState.DONE:
                    return _DONE
                if entry.status is EventState.IN_FLIGHT:
                    return Claim(ClaimStatus.IN_FLIGHT, retry_after=entry.expires - now)
            # A done or failed entry past its retention counts as never
            # seen; a lease that ran out was an attempt, and counts.
            if entry.status is EventState.IN_FLIGHT or entry.expires > now:
                attempts = entry.attempts + 1
                error = entry.error
        number = next(self._tokens)
        token = str(number)
        entry = _Entry(token, now + lease, now + self._wall_offset, attempts, error)
        self._entries[event_id] = entry
        self._order.append((event_id, entry))
        self._trim(now, sweep=number % self._SWEEP_EVERY == 0)
        return Claim(ClaimStatus.CLAIMED, token)

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`."""
        return self._settle(event_id, token, EventState.DONE, retention)

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`."""
        with self._lock:
            if self._owned(event_id, token, self._clock()) is None:
                return False
            del self._entries[event_id]
            return True

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`."""
        return self._settle(event_id, token, EventState.IN_FLIGHT, lease)

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        """See :meth:`.DedupeStore.fail`. The error is kept with the id."""
        return self._settle(event_id, token, EventState.FAILED, retention, error, attempts)

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`."""
        with self._lock:
            entry = self._entries.get(event_id)
            if entry is None or entry.expires <= self._clock():
                return None
            return _stored(event_id, entry)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`. Scans every entry."""
        with self._lock:
            now = self._clock()
            found = [
                _stored(event_id, entry)
                for event_id, entry in reversed(self._entries.items())
                if entry.status is EventState.FAILED and entry.expires > now
            ]
        found.sort(key=lambda stored: stored.updated_at, reverse=True)
        return found[:limit]

    def _owned(self, event_id: str, token: str, now: float) -> _Entry | None:
        entry = self._entries.get(event_id)
        if (
            entry is None
            or entry.status is not EventState.IN_FLIGHT
            or entry.token != token
            or entry.expires <= now
        ):
            return None
        return entry

    def _settle(
        self,
        event_id: str,
        token: str,
        status: EventState,
        seconds: float,
        error: str | None = None,
        attempts: int | None = None,
    ) -> bool:
        with self._lock:
            return self._settled(event_id, token, status, seconds, self._clock(), error, attempts)

    def _settled(
        self,
        event_id: str,
        token: str,
        status: EventState,
        seconds: float,
        now: float,
        error: str | None = None,
        attempts: int | None = None,
    ) -> bool:
        entry = self._owned(event_id, token, now)
        if entry is None:
            return False
        entry.status = status
        entry.expires = now + seconds
        entry.updated = now + self._wall_offset
        if error is not None:
            entry.error = error
        if attempts is not None:
            entry.attempts = attempts
        return True

    def _trim(self, now: float, sweep: bool) -> None:
        entries = self._entries
        order = self._order
        while len(entries) > self.max_entries:
            self._forget(*order.popleft())
        if not sweep:
            return
        # Claims come in time order and retention is one setting, so expired
        # entries gather at the front: a few are dropped now and then, never
        # by a full scan.
        for _ in range(self._SWEEP_EVERY):
            if not order or order[0][1].expires > now:
                break
            self._forget(*order.popleft())
        # Released and re-claimed ids leave pairs behind whose entry is gone;
        # past twice the bound they are dropped in one pass.
        if len(order) > 2 * self.max_entries:
            self._order = deque(pair for pair in order if entries.get(pair[0]) is pair[1])

    def _forget(self, event_id: str, entry: _Entry) -> None:
        if self._entries.get(event_id) is entry:
            del self._entries[event_id]

    # -- latest_by (flask_ploints._ordering.TurnsWithClaims)

    def order_begin(self, key: str, timestamp: int, lease: float) -> Turn:
        """See :meth:`.OrderedStore.order_begin`."""
        with self._lock:
            return self._take_turn(key, timestamp, lease, self._clock())

    def order_end(self, key: str, token: str, timestamp: int | None, retention: float) -> bool:
        """See :meth:`.OrderedStore.order_end`."""
        with self._lock:
            return self._end_turn(key, token, timestamp, retention, self._clock())

    def claim_with_turns(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        keys: t.Sequence[str],
        timestamp: int,
    ) -> tuple[Claim, list[Turn]]:
        """See :meth:`.TurnsWithClaims.claim_with_turns`: under the lock
        once.
        """
        with self._lock:
            now = self._clock()
            claim = self._claim(event_id, lease, now)
            turns: list[Turn] = []
            if claim.status is ClaimStatus.CLAIMED:
                for key in keys:
                    turns.append(self._take_turn(key, timestamp, lease, now))
            return claim, turns

    def commit_with_turns(
        self, event_id: str, token: str, retention: float, ends: t.Sequence[TurnEnd]
    ) -> bool:
        """See :meth:`.TurnsWithClaims.commit_with_turns`: under the lock
        once.
        """
        with self._lock:
            now = self._clock()
            for key, turn_token, stamp in ends:
                self._end_turn(key, turn_token, stamp, retention, now)
            return self._settled(event_id, token, EventState.DONE, retention, now)

    def _take_turn(self, key: str, timestamp: int, lease: float, now: float) -> Turn:
        state = self._orders.get(key)
        if state is None:
            if len(self._orders) >= self.max_entries:
                self._forget_orders(now)
            state = self._orders[key] = [None, 0.0, "", 0.0]
        newest, until, holder, turn_ends = state
        if holder and turn_ends > now:
            return Turn(TurnStatus.BUSY, retry_after=turn_ends - now)
        if until <= now:
            newest = state[0] = None
        if newest is not None and timestamp < newest:
            return Turn(TurnStatus.STALE, newest=newest)
        token = str(next(self._tokens))
        state[2:] = [token, now + lease]
        return Turn(TurnStatus.RUN, token, newest)

    def _end_turn(
        self, key: str, token: str, timestamp: int | None, retention: float, now: float
    ) -> bool:
        state = self._orders.get(key)
        # A turn that outlived its lease still ends, unless taken over.
        if state is None or state[2] != token:
            return False
        if timestamp is not None and (state[0] is None or state[0] < timestamp):
            state[0:2] = [timestamp, now + retention]
        elif timestamp is not None:
            state[1] = now + retention
        state[2:] = ["", 0.0]
        return True

    def _forget_orders(self, now: float) -> None:
        # Past the bound: drop what expired, then the oldest remembered.
        orders = self._orders
        for key in [key for key, state in orders.items() if state[1] <= now and state[3] <= now]:
            del orders[key]
        while len(orders) >= self.max_entries:
            del orders[next(iter(orders))]


def _stored(event_id: str, entry: _Entry) -> StoredEvent:
    return StoredEvent(
        id=event_id,
        status=entry.status,
        attempts=entry.attempts,
        error=entry.error,
        payload=None,
        updated_at=entry.updated,
    )


class NullStore:
    """A store that remembers nothing: every delivery is processed, dedupe is
    off. Chosen by ``PLOINTS_DEDUPE_STORE = None``.
    """

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """Always :attr:`.ClaimStatus.CLAIMED`."""
        return _CLAIMED

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """Do nothing."""
        return True

    def release(self, event_id: str, token: str) -> bool:
        """Do nothing."""
        return True

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """Do nothing."""
        return True

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        """Do nothing."""
        return True
