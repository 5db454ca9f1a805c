"""What processing an event did: :class:`Outcome` and :class:`Result`,
which the endpoint, replay and the worker translate.

.. versionadded:: 0.2
"""

from __future__ import annotations

import enum
import traceback
from dataclasses import dataclass

__all__ = ["MAX_ERROR", "Outcome", "Result", "error_text"]

#: The most characters of a traceback recorded with a failed event; the
#: start is cut, since the end names the error.
MAX_ERROR = 20_000


class Outcome(enum.StrEnum):
    """What processing an event did; its string is the value."""

    #: The handlers ran and the id is committed.
    PROCESSED = "processed"
    #: Handed to a worker, which runs the handlers and settles the claim.
    QUEUED = "queued"
    #: The id was processed already; nothing ran.
    DUPLICATE = "duplicate"
    #: Another delivery or worker holds the id now; nothing ran.
    IN_FLIGHT = "in_flight"
    #: A handler raised.
    FAILED = "failed"
    #: The dedupe store or the queue could not be reached; nothing ran.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of processing one event, with what its caller needs to
    answer for it.
    """

    outcome: Outcome
    #: With :attr:`Outcome.IN_FLIGHT`, seconds left on the holder's lease
    #: when the store knows them, else ``0``.
    retry_after: float = 0.0
    #: With :attr:`Outcome.FAILED`, what the handler raised; with
    #: :attr:`Outcome.UNAVAILABLE`, the store's or the dispatcher's error.
    error: BaseException | None = None
    #: Seconds spent in the handlers.
    duration: float = 0.0
    #: With :attr:`Outcome.FAILED` from :meth:`Processor.resume`, the token
    #: of the claim the worker still holds.
    token: str = ""


def error_text(exc: BaseException) -> str:
    """Return ``exc``'s traceback as it is recorded with a failed event: at
    most :data:`MAX_ERROR` characters, from the end.
    """
    return "".join(traceback.format_exception(exc))[-MAX_ERROR:]
