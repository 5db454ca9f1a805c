"""The dedupe store protocol: claim, then process, then commit.

A delivery is processed at most once per event id, and never lost:

1. :meth:`DedupeStore.claim` takes a lease on the id. The answer says whether
   this request owns the id now (:attr:`ClaimStatus.CLAIMED`, with a fresh
   token), whether the id was processed already (:attr:`ClaimStatus.DONE`), or
   whether another request holds a live lease on it
   (:attr:`ClaimStatus.IN_FLIGHT`).
2. The handlers run.
3. :meth:`DedupeStore.commit` marks the id done for the retention time, or
   :meth:`DedupeStore.release` drops the claim so the sender's retry is
   processed again. Both only act while the token still owns the claim: a
   request whose lease ran out cannot undo the request that took it over.

A lease that is neither committed nor released (the process died) expires,
and the next delivery of the id claims it again.
"""

from __future__ import annotations

import enum
import typing as t
from dataclasses import dataclass

from .._errors import StoreError

if t.TYPE_CHECKING:
    from .._events import Event

__all__ = [
    "Claim",
    "ClaimStatus",
    "DedupeStore",
    "EventState",
    "HandlerScope",
    "InspectableStore",
    "StoreError",
    "StoredEvent",
    "TransactionalStore",
]


class EventState(enum.StrEnum):
    """The state a store keeps for an event id, the same in every store.
    Being a string enum, each member equals its value (``"failed"``), which
    is also what the SQL store writes and what the Redis store abbreviates
    to its first letter.

    .. versionadded:: 0.2
    """

    #: Claimed, and its lease has not run out: processing, or queued.
    IN_FLIGHT = "in_flight"
    #: Processed; deliveries of the id are duplicates until its retention
    #: passes.
    DONE = "done"
    #: Given up on (:meth:`DedupeStore.fail`), with its error; the next
    #: delivery of the id claims it again.
    FAILED = "failed"


class ClaimStatus(enum.Enum):
    """The outcome of :meth:`DedupeStore.claim`: the caller's answer, not a
    stored state; :attr:`DONE` and :attr:`IN_FLIGHT` mean the id's
    :class:`EventState` of the same name.
    """

    #: The caller owns the id now and must process it.
    CLAIMED = "claimed"
    #: The id was processed already; skip it.
    DONE = EventState.DONE.value
    #: Another caller holds a live lease on the id.
    IN_FLIGHT = EventState.IN_FLIGHT.value


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to :meth:`DedupeStore.claim`.

    :param status: what the caller must do.
    :param token: with :attr:`ClaimStatus.CLAIMED`, the token that proves
        ownership to :meth:`~DedupeStore.commit` and
        :meth:`~DedupeStore.release`; empty otherwise.
    :param retry_after: with :attr:`ClaimStatus.IN_FLIGHT`, the seconds left
        on the holder's lease, when the store knows them; ``0`` otherwise.
    """

    status: ClaimStatus
    token: str = ""
    retry_after: float = 0.0


@t.runtime_checkable
class DedupeStore(t.Protocol):
    """What the receiver needs from a dedupe store.

    Implementations must be safe to call from many threads at once, and every
    method must either do what it says or raise; a store that cannot answer
    raises :class:`StoreError`. Use :class:`flask_ploints.testing.StoreContract`
    to check an implementation.
    """

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        """Take a lease of ``lease`` seconds on ``event_id`` unless it is done
        or leased by someone else. An id that was released, whose lease
        expired, or that was marked failed can be claimed again.

        :param payload: the event's raw body; a store may keep it so a failed
            event can be replayed, or ignore it.
        """

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        """Mark ``event_id`` done for ``retention`` seconds.

        :return: ``False`` when ``token`` no longer owns the claim; nothing
            changes then.
        """

    def release(self, event_id: str, token: str) -> bool:
        """Drop the claim so the next delivery processes the id again.

        :return: ``False`` when ``token`` no longer owns the claim; nothing
            changes then.
        """

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        """Renew the lease to ``lease`` seconds from now, for work that runs
        longer than the lease it started with.

        :return: ``False`` when ``token`` no longer owns the claim.
        """

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        """Give up on ``event_id``: record ``error`` for ``retention`` seconds
        and let the next delivery of the id claim it again.

        :param attempts: how many times the handlers ran under this claim,
            when its holder counted them (a Celery worker retries under one
            claim): recorded as :attr:`StoredEvent.attempts`. ``None`` keeps
            the count of claims.
        :return: ``False`` when ``token`` no longer owns the claim.
        """


@t.runtime_checkable
class TransactionalStore(DedupeStore, t.Protocol):
    """A store that can hold a claim inside the transaction the handlers
    write in, so that :meth:`~DedupeStore.commit` commits the claim and the
    handlers' writes together, and :meth:`~DedupeStore.release` and
    :meth:`~DedupeStore.fail` roll both back: the handlers' effects on that
    database happen exactly once. The receiver holds claims for handlers
    that run inline, and for a worker's run of a queued event.

    .. versionadded:: 0.2
    """

    def hold(
        self,
        event_id: str,
        lease: float,
        payload: bytes | None,
        retention: float,
        token: str | None = None,
    ) -> Claim:
        """Claim ``event_id`` inside the transaction, as done for
        ``retention`` seconds once it commits. With ``token``, take over that
        (durable) claim of a queued event, or claim the id again when its
        lease ran out.
        """


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """What a store remembers about one event id, as returned by
    :meth:`InspectableStore.get` and :meth:`InspectableStore.failed`.

    :param id: the event id.
    :param status: the id's state; it equals its string value
        (``"in_flight"``, ``"done"`` or ``"failed"``).
    :param attempts: how many times the id was claimed since the store last
        forgot it. A store may forget an in-flight id whose lease ran out (the
        Redis store does), so the count is a lower bound.
    :param error: the error recorded by the last :meth:`DedupeStore.fail`, or
        ``None``.
    :param payload: the raw body given to :meth:`DedupeStore.claim`, when the
        store keeps payloads; ``None`` otherwise.
    :param updated_at: when the entry last changed, in seconds since the
        epoch.

    .. versionadded:: 0.1
    """

    id: str
    status: EventState
    attempts: int
    error: str | None
    payload: bytes | None
    updated_at: float


@t.runtime_checkable
class InspectableStore(t.Protocol):
    """A store that can show what it remembers, for the delivery log and for
    replaying failed events. Stores implement it besides
    :class:`DedupeStore`; the receiver itself never needs it.

    .. versionadded:: 0.1
    """

    def get(self, event_id: str) -> StoredEvent | None:
        """Return what the store holds for ``event_id``.

        :return: ``None`` when the store holds nothing live for the id: never
            seen, released, past its retention, or its lease ran out.
        """

    def failed(self, limit: int = 100) -> list[StoredEvent]:
        """Return up to ``limit`` events given up on with
        :meth:`DedupeStore.fail` and still retained, newest first.
        """


@t.runtime_checkable
class HandlerScope(t.Protocol):
    """A store or dispatcher that wraps the handlers of every event it is
    used for. The scope is entered just before the first handler and left
    after the last, with the exception of a handler that raised, before the
    claim is settled.
    """

    def handler_scope(self, event: Event) -> t.ContextManager[None]:
        """Return the context manager to run ``event``'s handlers in."""
