"""Running an event again: a failed event from the payload the dedupe store
kept (:func:`replay`), or any verified body, such as one from the delivery
log (:func:`rerun`).

An event is recorded as failed when a Celery worker gave up on it (see
:mod:`flask_ploints._celery`), or when a run here failed. Once the cause is
fixed, the event goes through the same steps as a delivery: its id is
claimed, the instance's dispatcher runs it, and the claim is settled. With
``PLOINTS_DISPATCH = "sync"`` the handlers run now and the id is committed;
with ``"celery"`` a task is queued and a worker settles it.

.. code-block:: python

    from flask_ploints.replay import replay

    for stored in store.failed():
        replay(app, stored.id)

:func:`replay` needs a store that implements
:class:`~flask_ploints.stores.InspectableStore` and keeps payloads (the
Redis and SQL stores do by default; the memory store does not).

.. versionadded:: 0.1
"""

from __future__ import annotations

import enum

from flask import Flask

from ._errors import DispatchError
from ._errors import StoreError
from ._events import parse_event
from ._processing import Outcome
from ._processing import Result
from ._state import Receiver
from ._state import receiver_for
from .stores import EventState
from .stores import InspectableStore

__all__ = ["ReplayOutcome", "replay"]


class ReplayOutcome(enum.StrEnum):
    """What :func:`replay` or :func:`rerun` did; its string is the value."""

    #: The handlers ran and the id is committed (sync dispatch).
    PROCESSED = Outcome.PROCESSED.value
    #: A task was queued; a worker runs the handlers (Celery dispatch).
    QUEUED = Outcome.QUEUED.value
    #: A handler raised again; the store records the event as failed, with
    #: the new traceback.
    FAILED = Outcome.FAILED.value
    #: The id was processed already; nothing ran.
    DUPLICATE = Outcome.DUPLICATE.value


def replay(
    app: Flask, event_id: str, name: str = "ploints", account: str | None = None
) -> ReplayOutcome:
    """Run a failed event again, from the payload its store kept.

    :param app: the app the instance is registered on.
    :param event_id: the id of a failed event.
    :param name: which :class:`~flask_ploints.PlointsWebhooks` instance.
    :param account: the event's account, on an endpoint for many accounts.
    :return: :attr:`~ReplayOutcome.PROCESSED`,
        :attr:`~ReplayOutcome.QUEUED` or :attr:`~ReplayOutcome.FAILED`.
    :raises RuntimeError: no instance of that name on ``app``.
    :raises LookupError: the store cannot show what it holds, does not hold
        the id, or holds it without its payload.
    :raises ValueError: the event is not failed (done, or in flight), or a
        delivery took it between the check and the claim; ``account`` is
        missing on an endpoint for many accounts, or given on one for one.
    :raises flask_ploints._errors.StoreError: the store is unavailable.
    :raises flask_ploints._errors.DispatchError: the task could not be
        queued; the event stays failed.
    """
    receiver = receiver_for(app, name)
    _check_account(receiver, account)
    store = receiver.store
    if not isinstance(store, InspectableStore):
        raise LookupError(
            f"the dedupe store of {name!r} ({type(store).__name__}) does not show the events it"
            " holds, so failed events cannot be replayed; use RedisStore or SQLAlchemyStore"
        )
    stored = store.get(receiver.processor.namespace.key(event_id, account))
    if stored is None:
        raise LookupError(f"event {event_id!r} is not in the dedupe store")
    if stored.status is not EventState.FAILED:
        raise ValueError(f"event {event_id!r} is {stored.status}, not failed")
    if stored.payload is None:
        raise LookupError(
            f"event {event_id!r} has no payload in the dedupe store; have Ploints resend it"
        )
    outcome = _run(app, name, stored.payload, stored.error, account)
    if outcome is ReplayOutcome.DUPLICATE:
        raise ValueError(f"event {event_id!r} was processed meanwhile")
    return outcome


def rerun(
    app: Flask, payload: bytes, name: str = "ploints", account: str | None = None
) -> ReplayOutcome:
    """Run a verified event body through the same claim, handlers and
    settling as a delivery, and report the outcome instead of answering.

    Unlike a delivery, a handler failure records the event as failed (with
    its traceback and payload) rather than releasing it, so that it can be
    found and replayed again.

    :param app: the app the instance is registered on.
    :param payload: the raw body, as it was signed and verified.
    :param name: which :class:`~flask_ploints.PlointsWebhooks` instance.
    :param account: the account it came from, on an endpoint for many
        accounts.
    :raises RuntimeError: no instance of that name on ``app``.
    :raises ValueError: the body is not a valid event
        (:class:`~flask_ploints._errors.InvalidEvent`), or the event is being
        processed right now; ``account`` is missing on an endpoint for many
        accounts, or given on one for one.
    :raises flask_ploints._errors.StoreError: the store is unavailable.
    :raises flask_ploints._errors.DispatchError: the task could not be
        queued.
    """
    return _run(app, name, payload, None, account)


def _check_account(receiver: Receiver, account: str | None) -> None:
    # Without it, an event of an endpoint for many accounts would be looked
    # up and claimed under another key than its deliveries', and its
    # handlers would see no account.
    many = receiver.settings.accounts is not None
    if many and account is None:
        raise ValueError(
            f"PlointsWebhooks {receiver.name!r} serves many accounts: give the event's account"
        )
    if not many and account is not None:
        raise ValueError(f"PlointsWebhooks {receiver.name!r} serves one account: give no account")


def _run(
    app: Flask, name: str, payload: bytes, error: str | None, account: str | None
) -> ReplayOutcome:
    receiver = receiver_for(app, name)
    _check_account(receiver, account)
    processor = receiver.processor
    event = parse_event(payload, account)
    with app.app_context():
        result: Result = processor.rerun(app, event, error)
    if result.outcome is Outcome.IN_FLIGHT:
        raise ValueError(f"event {event.id!r} is being processed right now")
    if result.outcome is Outcome.UNAVAILABLE:
        assert result.error is not None
        if isinstance(result.error, StoreError | DispatchError):
            raise result.error
        raise StoreError(f"dedupe store: {result.error!r}") from result.error
    return ReplayOutcome(result.outcome.value)
