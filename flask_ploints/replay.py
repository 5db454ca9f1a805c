"""Running an event again: a failed event from the payload the dedupe store
kept (:func:`replay`), or any verified body, such as one from the delivery
log (:func:`rerun`).

An event is recorded as failed when a Celery worker gave up on it (see
:mod:`flask_ploints.celery`), or when a run here failed. Once the cause is
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
import logging
import time
import traceback
import typing as t

from flask import Flask

from . import signals
from .dispatch import HandlerError
from .events import parse_event
from .signals import notify
from .stores import ClaimStatus
from .stores import InspectableStore

if t.TYPE_CHECKING:
    from .extension import Receiver

__all__ = ["MAX_ERROR", "ReplayOutcome", "error_text", "replay", "rerun"]

logger = logging.getLogger("flask_ploints")

#: The most characters of a traceback recorded with a failed event; the
#: start is cut, since the end names the error.
MAX_ERROR = 20_000


class ReplayOutcome(enum.StrEnum):
    """What :func:`replay` or :func:`rerun` did; its string is the value."""

    #: The handlers ran and the id is committed (sync dispatch).
    PROCESSED = "processed"
    #: A task was queued; a worker runs the handlers (Celery dispatch).
    QUEUED = "queued"
    #: A handler raised again; the store records the event as failed, with
    #: the new traceback.
    FAILED = "failed"
    #: The id was processed already; nothing ran.
    DUPLICATE = "duplicate"


def error_text(exc: BaseException) -> str:
    """Return ``exc``'s traceback as it is recorded with a failed event: at
    most :data:`MAX_ERROR` characters, from the end.
    """
    return "".join(traceback.format_exception(exc))[-MAX_ERROR:]


def _receiver(app: Flask, name: str) -> Receiver:
    try:
        return t.cast("Receiver", app.extensions["ploints"][name])
    except KeyError:
        raise RuntimeError(
            f"PlointsWebhooks {name!r} is not registered on app {app.name!r};"
            " did you forget to call init_app(app)?"
        ) from None


def replay(app: Flask, event_id: str, name: str = "ploints") -> ReplayOutcome:
    """Run a failed event again, from the payload its store kept.

    :param app: the app the instance is registered on.
    :param event_id: the id of a failed event.
    :param name: which :class:`~flask_ploints.PlointsWebhooks` instance.
    :return: :attr:`~ReplayOutcome.PROCESSED`,
        :attr:`~ReplayOutcome.QUEUED` or :attr:`~ReplayOutcome.FAILED`.
    :raises RuntimeError: no instance of that name on ``app``.
    :raises LookupError: the store cannot show what it holds, does not hold
        the id, or holds it without its payload.
    :raises ValueError: the event is not failed (done, or in flight), or a
        delivery took it between the check and the claim.
    :raises flask_ploints.dispatch.DispatchError: the task could not be
        queued; the event stays failed.
    """
    receiver = _receiver(app, name)
    store = receiver.store
    if not isinstance(store, InspectableStore):
        raise LookupError(
            f"the dedupe store of {name!r} ({type(store).__name__}) does not show the events it"
            " holds, so failed events cannot be replayed; use RedisStore or SQLAlchemyStore"
        )
    stored = store.get(event_id)
    if stored is None:
        raise LookupError(f"event {event_id!r} is not in the dedupe store")
    if stored.status != "failed":
        raise ValueError(f"event {event_id!r} is {stored.status}, not failed")
    if stored.payload is None:
        raise LookupError(
            f"event {event_id!r} has no payload in the dedupe store; have Ploints resend it"
        )
    outcome = _run(app, receiver, stored.payload, stored.error)
    if outcome is ReplayOutcome.DUPLICATE:
        raise ValueError(f"event {event_id!r} was processed meanwhile")
    return outcome


def rerun(app: Flask, payload: bytes, name: str = "ploints") -> ReplayOutcome:
    """Run a verified event body through the same claim, handlers and
    settling as a delivery, and report the outcome instead of answering.

    Unlike a delivery, a handler failure records the event as failed (with
    its traceback and payload) rather than releasing it, so that it can be
    found and replayed again.

    :param app: the app the instance is registered on.
    :param payload: the raw body, as it was signed and verified.
    :param name: which :class:`~flask_ploints.PlointsWebhooks` instance.
    :raises RuntimeError: no instance of that name on ``app``.
    :raises ValueError: the body is not a valid event
        (:class:`~flask_ploints.events.InvalidEvent`), or the event is being
        processed right now.
    :raises flask_ploints.dispatch.DispatchError: the task could not be
        queued.
    """
    return _run(app, _receiver(app, name), payload, None)


def _run(app: Flask, receiver: Receiver, payload: bytes, error: str | None) -> ReplayOutcome:
    name = receiver.name
    store = receiver.store
    retention = receiver.settings.retention
    event = parse_event(payload)
    claim = store.claim(event.id, receiver.dispatcher.lease, payload)
    if claim.status is ClaimStatus.DONE:
        notify(signals.duplicate_skipped, app, name, event=event)
        return ReplayOutcome.DUPLICATE
    if claim.status is ClaimStatus.IN_FLIGHT:
        raise ValueError(f"event {event.id!r} is being processed right now")
    started = time.perf_counter()
    with app.app_context():
        try:
            receiver.dispatcher.dispatch(app, event, claim, name)
        except HandlerError as exc:
            duration = time.perf_counter() - started
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            store.fail(event.id, claim.token, error_text(cause), retention)
            logger.error(
                "event %s (%s) failed again: %s", event.id, event.type, exc, exc_info=cause
            )
            notify(
                signals.handler_failed,
                app,
                name,
                event=event,
                exception=cause,
                duration=duration,
            )
            return ReplayOutcome.FAILED
        except BaseException:
            # Failed, with its payload and the error it had, rather than a
            # claim that lapses and takes the payload with it.
            store.fail(event.id, claim.token, error or "not run: could not be queued", retention)
            raise
        if not receiver.dispatcher.runs_inline:
            logger.info("event %s (%s) queued again", event.id, event.type)
            return ReplayOutcome.QUEUED
        duration = time.perf_counter() - started
        store.commit(event.id, claim.token, retention)
        logger.info("event %s (%s) processed again", event.id, event.type)
        notify(signals.event_processed, app, name, event=event, duration=duration)
    return ReplayOutcome.PROCESSED
