"""The lifecycle signals that a :class:`DeliveryLog` turns into
rows.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextvars
import logging
import time
import traceback
import typing as t
from datetime import datetime

from flask import Flask
from flask import has_request_context
from flask import request

from .. import signals
from .._logfields import delivery_fields
from .._logfields import event_fields
from ._table import MAX_REASON

if t.TYPE_CHECKING:
    from .._events import Event

__all__ = ["PAUSE", "Safely", "connect_signals"]

logger = logging.getLogger("flask_ploints")

#: Seconds the log skips its rows after a write failed.
PAUSE = 30.0

#: Longest claimed account kept in a rejected row's reason.
MAX_CLAIMED = 128

# What the latest_by handlers of the event being processed skipped as stale,
# for the reason of its processed row.
_stale: contextvars.ContextVar[tuple[Event, list[str]] | None] = contextvars.ContextVar(
    "ploints_log_stale", default=None
)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:MAX_REASON] if lines else ""


class Safely:
    """Calls ``record(outcome, received_at=..., **fields)`` for each
    delivery; when it raises, logs the error and skips the rows of the next
    :data:`PAUSE` seconds: the next deliveries would meet the same database.
    """

    def __init__(self, record: t.Callable[..., object]) -> None:
        self.record = record
        self._paused_until = 0.0

    def __call__(self, outcome: str, *, started_before: float = 0.0, **fields: t.Any) -> None:
        # A blinker receiver that raises stops the receivers after it
        # (metrics, the app's own), so the error ends here.
        now = time.monotonic()
        if now < self._paused_until:
            return
        try:
            self.record(outcome, received_at=time.time() - started_before, **fields)
        except Exception:
            self._paused_until = now + PAUSE
            event = fields.get("event")
            logger.exception(
                "the delivery log failed to record a %s delivery; it skips its rows for %g s",
                outcome,
                PAUSE,
                extra=delivery_fields(outcome)
                if event is None
                else event_fields(event, outcome, fields.get("duration")),
            )


def connect_signals(app: Flask, record: t.Callable[..., None]) -> None:
    """Connect receivers of ``app``'s lifecycle signals that call
    ``record(outcome, **fields)`` for each delivery outcome.
    """

    def processed(sender: Flask, *, name: str, event: Event, duration: float) -> None:
        noted = _stale.get()
        reason = None
        if noted is not None:
            _stale.set(None)
            # Another event's when that one ended without a row (a 409).
            if noted[0] is event:
                reason = "; ".join(noted[1])[:MAX_REASON]
        record(
            "processed",
            name=name,
            event=event,
            duration=duration,
            started_before=duration,
            **({} if reason is None else {"reason": reason}),
        )

    def stale(
        sender: Flask, *, event: Event, handler: str, key: str, newer: datetime, **extra: t.Any
    ) -> None:
        noted = _stale.get()
        if noted is None or noted[0] is not event:
            noted = (event, [])
            _stale.set(noted)
        noted[1].append(f"stale for handler {handler!r}: key {key!r}, {newer.isoformat()} applied")

    def duplicate(sender: Flask, *, name: str, event: Event, **extra: t.Any) -> None:
        record("duplicate", name=name, event=event)

    def failed(
        sender: Flask,
        *,
        name: str,
        event: Event,
        exception: BaseException | None,
        duration: float,
        **extra: t.Any,
    ) -> None:
        _stale.set(None)
        text = "".join(traceback.format_exception(exception)) if exception else None
        reason = _last_line(text) if text else None
        record(
            "failed",
            name=name,
            event=event,
            reason=reason,
            traceback=text,
            duration=duration,
            started_before=duration,
        )

    def queued(sender: Flask, *, name: str, event: Event, **extra: t.Any) -> None:
        record("queued", name=name, event=event)

    def retrying(
        sender: Flask,
        *,
        name: str,
        event: Event,
        exception: BaseException,
        duration: float | None,
        attempt: int,
        attempts: int,
        retry_at: float,
        **extra: t.Any,
    ) -> None:
        text = "".join(traceback.format_exception(exception))
        when = time.strftime("%H:%M:%S", time.gmtime(retry_at))
        reason = f"attempt {attempt} of {attempts}; next at {when} UTC: {_last_line(text)}"
        record(
            "retrying",
            name=name,
            event=event,
            reason=reason,
            traceback=text,
            duration=duration,
            started_before=duration or 0.0,
        )

    def rejected(status: int) -> t.Callable[..., None]:
        def receiver(sender: Flask, *, name: str, reason: str, **extra: t.Any) -> None:
            # The account the URL names is unverified: kept in the reason,
            # never in the account column, so that a forged request cannot
            # file a row under a real account's name (nor show it to that
            # account's staff).
            claimed = None
            client = None
            if has_request_context():
                claimed = (request.view_args or {}).get("account")
                # ProxyFix, where the app has it, makes this the client's.
                client = request.remote_addr
            # Its string form: a converter (<uuid:account>) makes it no string.
            if claimed is not None:
                reason = (
                    f"{reason} (to account {str(claimed)[:MAX_CLAIMED]!r} per its URL, unverified)"
                )
            record("rejected", name=name, reason=reason, status=status, client=client)

        return receiver

    signals.event_processed.connect(processed, sender=app, weak=False)
    signals.duplicate_skipped.connect(duplicate, sender=app, weak=False)
    signals.handler_failed.connect(failed, sender=app, weak=False)
    signals.event_queued.connect(queued, sender=app, weak=False)
    signals.attempt_failed.connect(retrying, sender=app, weak=False)
    # The statuses the endpoint answers them with (see flask_ploints.signals).
    signals.signature_rejected.connect(rejected(401), sender=app, weak=False)
    signals.payload_rejected.connect(rejected(400), sender=app, weak=False)
    signals.handler_skipped_stale.connect(stale, sender=app, weak=False)
