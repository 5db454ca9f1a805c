"""A dedupe store in this process's memory."""

from __future__ import annotations

import secrets
import threading
import time
import typing as t
from collections import OrderedDict

from .base import Claim
from .base import ClaimStatus
from .base import StoredEvent

__all__ = ["MemoryStore", "NullStore"]

_CLAIMED = Claim(ClaimStatus.CLAIMED)
_DONE = Claim(ClaimStatus.DONE)


class _Entry(t.NamedTuple):
    #: ``None`` marks an id given up on by :meth:`MemoryStore.fail`.
    status: ClaimStatus | None
    token: str
    expires: float
    error: str | None = None
    attempts: int = 1
    #: Wall-clock time of the last change, for :class:`.StoredEvent`.
    updated: float = 0.0

    def forgotten(self, now: float) -> bool:
        # A done or failed entry past its retention counts as never seen; an
        # in-flight one whose lease ran out was an attempt, and counts.
        return self.status is not ClaimStatus.IN_FLIGHT and self.expires <= now


class MemoryStore:
    """Remembers event ids in a dict guarded by a lock.

    **Per process.** Each worker process has its own memory, so with several
    gunicorn workers or hosts a retry that lands on another worker is
    processed again. Use it for development, tests and single-process
    deployments; use the Redis or SQL store in production. The extension warns
    at start-up when it is used outside testing.

    The store is bounded: past ``max_entries`` ids, the oldest are forgotten
    first, whatever their retention. Size the bound above the number of
    events you receive in a retention period.

    It implements :class:`.InspectableStore`; payloads are not kept, so
    :attr:`.StoredEvent.payload` is always ``None``.

    :param max_entries: the most ids remembered at once.
    :param clock: a monotonic clock in seconds; tests may pass their own.
    """

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
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """See :meth:`.DedupeStore.claim`. The payload is not kept."""
        with self._lock:
            now = self._clock()
            entry = self._entries.get(event_id)
            if entry is not None and entry.expires > now:
                if entry.status is ClaimStatus.DONE:
                    return _DONE
                if entry.status is ClaimStatus.IN_FLIGHT:
                    return Claim(ClaimStatus.IN_FLIGHT, retry_after=entry.expires - now)
            token = secrets.token_hex(8)
            attempts = 1
            error = None
            if entry is not None and not entry.forgotten(now):
                attempts = entry.attempts + 1
                error = entry.error
            self._put(
                event_id,
                _Entry(ClaimStatus.IN_FLIGHT, token, now + lease, error, attempts, time.time()),
                now,
            )
            return Claim(ClaimStatus.CLAIMED, token)

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.commit`."""
        return self._settle(event_id, token, ClaimStatus.DONE, retention)

    def release(self, event_id: str, token: str) -> bool:
        """See :meth:`.DedupeStore.release`."""
        with self._lock:
            if not self._owns(event_id, token):
                return False
            del self._entries[event_id]
            return True

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """See :meth:`.DedupeStore.extend`."""
        return self._settle(event_id, token, ClaimStatus.IN_FLIGHT, lease)

    def fail(self, event_id: str, token: str, error: str, retention: float) -> bool:
        """See :meth:`.DedupeStore.fail`. The error is kept with the id."""
        return self._settle(event_id, token, None, retention, error)

    def get(self, event_id: str) -> StoredEvent | None:
        """See :meth:`.InspectableStore.get`."""
        with self._lock:
            entry = self._entries.get(event_id)
            if entry is None or entry.expires <= self._clock():
                return None
            return _stored(event_id, entry)

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """See :meth:`.InspectableStore.failed`. Scans every entry."""
        found: list[StoredEvent] = []
        with self._lock:
            now = self._clock()
            # Entries are in the order they last changed, so newest last.
            for event_id, entry in reversed(self._entries.items()):
                if len(found) >= limit:
                    break
                if entry.status is None and entry.expires > now:
                    found.append(_stored(event_id, entry))
        return found

    def _owns(self, event_id: str, token: str) -> bool:
        entry = self._entries.get(event_id)
        return (
            entry is not None
            and entry.status is ClaimStatus.IN_FLIGHT
            and entry.token == token
            and entry.expires > self._clock()
        )

    def _settle(
        self,
        event_id: str,
        token: str,
        status: ClaimStatus | None,
        seconds: float,
        error: str | None = None,
    ) -> bool:
        with self._lock:
            if not self._owns(event_id, token):
                return False
            now = self._clock()
            entry = self._entries[event_id]
            self._put(
                event_id,
                entry._replace(
                    status=status,
                    expires=now + seconds,
                    error=entry.error if error is None else error,
                    updated=time.time(),
                ),
                now,
            )
            return True

    def _put(self, event_id: str, entry: _Entry, now: float) -> None:
        entries = self._entries
        entries[event_id] = entry
        entries.move_to_end(event_id)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        # Entries are kept roughly in expiry order, so expired ones gather at
        # the front and are dropped a few at a time, never by a full scan.
        for _ in range(2):
            if not entries:
                break
            oldest = next(iter(entries.values()))
            if oldest.expires > now:
                break
            entries.popitem(last=False)


def _stored(event_id: str, entry: _Entry) -> StoredEvent:
    return StoredEvent(
        id=event_id,
        status="failed" if entry.status is None else entry.status.value,
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

    def fail(self, event_id: str, token: str, error: str, retention: float) -> bool:
        """Do nothing."""
        return True
