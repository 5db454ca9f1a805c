"""A dedupe store in this process's memory."""

from __future__ import annotations

import secrets
import threading
import time
import typing as t
from collections import OrderedDict

from .base import Claim
from .base import ClaimStatus

__all__ = ["MemoryStore", "NullStore"]

_CLAIMED = Claim(ClaimStatus.CLAIMED)
_DONE = Claim(ClaimStatus.DONE)


class _Entry(t.NamedTuple):
    #: ``None`` marks an id given up on by :meth:`MemoryStore.fail`.
    status: ClaimStatus | None
    token: str
    expires: float
    error: str = ""


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
            self._put(event_id, _Entry(ClaimStatus.IN_FLIGHT, token, now + lease), now)
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

    def error(self, event_id: str) -> str | None:
        """Return the error recorded by :meth:`fail` for ``event_id``."""
        entry = self._entries.get(event_id)
        return entry.error if entry is not None and entry.status is None else None

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
        error: str = "",
    ) -> bool:
        with self._lock:
            if not self._owns(event_id, token):
                return False
            now = self._clock()
            self._put(event_id, _Entry(status, token, now + seconds, error), now)
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
