"""The facts every log record about an event carries as ``extra`` fields,
so that a JSON formatter indexes them: see :doc:`/observability`.

==========================  =================================================
field                       value
==========================  =================================================
``ploints_event_id``        the event's id; ``None`` before a body is parsed
``ploints_event_type``      the event's type; ``None`` likewise
``ploints_account``         the Ploints account the event came from; ``None``
                            for an endpoint of one account
``ploints_outcome``         what happened to the event (an
                            :class:`~flask_ploints._processing.Outcome` value,
                            or ``"rejected"`` for a refused delivery);
                            ``None`` while not known yet
``ploints_duration``        seconds spent in the handlers; ``None`` when they
                            did not run (yet)
==========================  =================================================

Every field is on every such record, ``None`` when not known, so that a
``%(ploints_outcome)s`` format string never fails.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t

if t.TYPE_CHECKING:
    from ._events import Event

logger = logging.getLogger("flask_ploints")

__all__ = ["FIELDS", "REJECTED", "delivery_fields", "event_fields", "log_event"]

#: The names of the fields, in the order of the table above.
FIELDS = (
    "ploints_event_id",
    "ploints_event_type",
    "ploints_account",
    "ploints_outcome",
    "ploints_duration",
)

#: The outcome of a delivery refused before it became an event (a bad
#: signature, a body that is not an event), as the metrics count it.
REJECTED = "rejected"


def event_fields(
    event: Event, outcome: str | None = None, duration: float | None = None
) -> dict[str, t.Any]:
    """Return the ``extra`` fields of a record about ``event``.

    :param outcome: what happened to it, when known.
    :param duration: seconds its handlers took, when they ran.
    """
    return delivery_fields(
        outcome,
        event_id=event.id,
        event_type=event.type,
        account=event.account,
        duration=duration,
    )


def delivery_fields(
    outcome: str | None = None,
    *,
    event_id: str | None = None,
    event_type: str | None = None,
    account: str | None = None,
    duration: float | None = None,
) -> dict[str, t.Any]:
    """Return the ``extra`` fields of a record about a delivery without an
    :class:`~flask_ploints.Event` at hand: one refused before its body was
    parsed, or a row of the delivery log.
    """
    return {
        "ploints_event_id": event_id,
        "ploints_event_type": event_type,
        "ploints_account": account,
        # The plain string, not the enum: what a JSON formatter writes.
        "ploints_outcome": None if outcome is None else str(outcome),
        "ploints_duration": duration,
    }


def log_event(
    level: int,
    event: Event,
    outcome: str | None,
    duration: float | None,
    message: str,
    *args: object,
    **kwargs: t.Any,
) -> None:
    """Log a record about ``event`` on the ``flask_ploints`` logger: the
    message after its id and type, quoted, with its fields.

    :param outcome: what happened to it, ``None`` while not known.
    :param duration: seconds its handlers took, ``None`` when they did not
        run (yet).
    :param kwargs: for :meth:`logging.Logger.log` (``exc_info``).
    """
    if not logger.isEnabledFor(level):
        return
    logger.log(
        level,
        "event %r (%r) " + message,
        event.id,
        event.type,
        *args,
        # The record names the caller, not this function.
        stacklevel=2,
        extra=event_fields(event, outcome, duration),
        **kwargs,
    )
