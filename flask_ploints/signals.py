"""Blinker signals sent by the receiver.

Every signal is sent with the real application object as sender (never the
``current_app`` proxy), so a receiver can be connected for one app with
``signal.connect(func, sender=app)``. Besides the keyword arguments listed for
each signal, every send carries ``name``: the name of the
:class:`~flask_ploints.PlointsWebhooks` instance that received the request.

Event-type signals are part of processing: an exception in a receiver is a
handler failure (the claim is released, the answer is ``500`` and Ploints
retries). Lifecycle signals are for observers such as logging and metrics: an
exception there is logged and does not change the answer.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import typing as t

from blinker import NamedSignal
from blinker import Namespace
from blinker import Signal

from ._events import EVENT_TYPES
from ._events import check_event_types
from ._logfields import REJECTED
from ._logfields import delivery_fields
from ._logfields import event_fields

if t.TYPE_CHECKING:
    from ._events import Event

__all__ = [
    "attempt_failed",
    "badge_issued",
    "campaign_conversion",
    "customer_created",
    "customer_tier_changed",
    "duplicate_skipped",
    "event_processed",
    "event_queued",
    "event_received",
    "handler_failed",
    "handler_skipped_stale",
    "payload_rejected",
    "points_earned",
    "points_redeemed",
    "reward_redeemed",
    "signal_for",
    "signature_rejected",
]

logger = logging.getLogger("flask_ploints")

_signals = Namespace()

#: A ``points.earned`` event was received. Arguments: ``event``.
points_earned = _signals.signal("points.earned")
#: A ``points.redeemed`` event was received. Arguments: ``event``.
points_redeemed = _signals.signal("points.redeemed")
#: A ``customer.created`` event was received. Arguments: ``event``.
customer_created = _signals.signal("customer.created")
#: A ``customer.tier_changed`` event was received. Arguments: ``event``.
customer_tier_changed = _signals.signal("customer.tier_changed")
#: A ``badge.issued`` event was received. Arguments: ``event``.
badge_issued = _signals.signal("badge.issued")
#: A ``reward.redeemed`` event was received. Arguments: ``event``.
reward_redeemed = _signals.signal("reward.redeemed")
#: A ``campaign.conversion`` event was received. Arguments: ``event``.
campaign_conversion = _signals.signal("campaign.conversion")

#: A verified, well-formed event arrived, before dedupe. Arguments: ``event``.
event_received = _signals.signal("ploints.event-received")
#: An event's handlers all returned and its id was committed (or, with
#: async dispatch, the worker finished it). Arguments: ``event``,
#: ``duration`` (seconds spent in the handlers).
event_processed = _signals.signal("ploints.event-processed")
#: A delivery of an event that was already processed was skipped.
#: Arguments: ``event``.
duplicate_skipped = _signals.signal("ploints.duplicate-skipped")
#: A handler registered with ``latest_by`` skipped an event strictly older
#: than the newest it applied for the same key; the delivery goes on (see
#: :doc:`/ordering`). Arguments: ``event``, ``handler`` (the handler's name
#: in the store), ``key`` (the key's value) and ``newer`` (the timestamp of
#: the newest event applied, an aware datetime).
#:
#: .. versionadded:: 0.2
handler_skipped_stale = _signals.signal("ploints.handler-skipped-stale")
#: A request failed signature verification (``401``). Arguments: ``reason``,
#: a short fixed string. The body is not passed: it is unverified.
signature_rejected = _signals.signal("ploints.signature-rejected")
#: A verified body was not a valid event (``400``). Arguments: ``reason``.
payload_rejected = _signals.signal("ploints.payload-rejected")
#: A handler raised. Arguments: ``event``, ``exception``, ``duration``. With
#: Celery dispatch it is sent once, when the worker gives up on the event;
#: earlier failed attempts are only logged.
handler_failed = _signals.signal("ploints.handler-failed")

#: With Celery dispatch, an event's task was queued (the endpoint's ``202``,
#: or a re-run). Arguments: ``event``.
#:
#: .. versionadded:: 0.2
event_queued = _signals.signal("ploints.event-queued")
#: With Celery dispatch, one of a worker's attempts at an event failed and
#: the next one is queued. Arguments: ``event``, ``exception``, ``duration``
#: (seconds spent in the handlers; ``None`` when they did not run, the
#: dedupe store having failed first), ``attempt`` (this attempt's number,
#: from 1), ``attempts`` (how many there can be), ``retry_at`` (when the
#: next one runs, in seconds since the epoch).
#:
#: .. versionadded:: 0.2
attempt_failed = _signals.signal("ploints.attempt-failed")

_BY_TYPE: dict[str, Signal] = {name: _signals.signal(name) for name in EVENT_TYPES}


def signal_for(event_type: str) -> Signal | None:
    """Return the signal for a documented event type, or ``None`` for a type
    this version does not know.
    """
    return _BY_TYPE.get(event_type)


_Handler = t.TypeVar("_Handler", bound=t.Callable[..., t.Any])


def on(*event_types: str) -> t.Callable[[_Handler], _Handler]:
    """Connect a handler to one or more event types for every app and every
    :class:`~flask_ploints.PlointsWebhooks` instance.

    The handler receives the :class:`~flask_ploints.Event` only, may be
    ``async def``, and is held strongly, so it may be defined inside a
    function.

    .. code-block:: python

        @on("customer.created")
        def welcome(event):
            ...

    :param event_types: documented event types.
    :raises ValueError: no type, or a type that has no signal.
    """
    signals = [_BY_TYPE[event_type] for event_type in check_event_types(event_types)]

    def decorator(func: _Handler) -> _Handler:
        require_runnable(func)

        @functools.wraps(func)
        def receiver(sender: t.Any, *, event: Event, **extra: t.Any) -> None:
            sender.ensure_sync(func)(event)

        for signal in signals:
            signal.connect(receiver, weak=False)
        return func

    return decorator


def require_runnable(func: t.Callable[..., t.Any]) -> None:
    """Refuse an ``async def`` handler when asgiref is missing, at
    registration rather than on the first delivery.

    :raises RuntimeError: ``func`` is a coroutine function and
        ``flask-ploints[async]`` is not installed.
    """
    if inspect.iscoroutinefunction(func) and importlib.util.find_spec("asgiref") is None:
        raise RuntimeError(
            f"{func.__qualname__} is async: install flask-ploints[async] to run async handlers"
        )


def notify(signal: NamedSignal, app: t.Any, name: str, **kwargs: t.Any) -> None:
    """Send a lifecycle signal for instance ``name`` of ``app``. An
    observer's exception is logged, never allowed to change the answer to the
    sender.
    """
    if not signal.receivers:
        return
    try:
        signal.send(app, name=name, **kwargs)
    except Exception:
        event = kwargs.get("event")
        outcome = _OUTCOMES.get(signal.name)
        logger.exception(
            "a receiver of %s raised",
            signal.name,
            extra=delivery_fields(outcome)
            if event is None
            else event_fields(event, outcome, kwargs.get("duration")),
        )


#: What each lifecycle signal says happened to the delivery, for the fields
#: of the record of a receiver that raised.
_OUTCOMES = {
    event_processed.name: "processed",
    duplicate_skipped.name: "duplicate",
    handler_failed.name: "failed",
    event_queued.name: "queued",
    attempt_failed.name: "retrying",
    signature_rejected.name: REJECTED,
    payload_rejected.name: REJECTED,
}
