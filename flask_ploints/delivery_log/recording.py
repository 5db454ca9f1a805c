"""The lifecycle signals that a :class:`~.storage.DeliveryLog` turns into
rows.

.. versionadded:: 0.2
"""

from __future__ import annotations

import traceback
import typing as t

from flask import Flask
from flask import has_request_context
from flask import request

from .. import signals
from .table import MAX_REASON

if t.TYPE_CHECKING:
    from ..events import Event

__all__ = ["connect_signals"]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:MAX_REASON] if lines else ""


def connect_signals(app: Flask, record: t.Callable[..., None]) -> None:
    """Connect receivers of ``app``'s lifecycle signals that call
    ``record(outcome, **fields)`` for each delivery outcome.
    """

    def processed(sender: Flask, *, name: str, event: Event, duration: float) -> None:
        record("processed", name=name, event=event, duration=duration, started_before=duration)

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

    def rejected(sender: Flask, *, name: str, reason: str, **extra: t.Any) -> None:
        # The account in the URL, unverified as the reason is; the
        # signal, sent from the request, does not carry it.
        value = (request.view_args or {}).get("account") if has_request_context() else None
        # Its string form: a converter (<uuid:account>) makes it no string.
        account = None if value is None else str(value)
        record("rejected", name=name, reason=reason, account=account)

    signals.event_processed.connect(processed, sender=app, weak=False)
    signals.duplicate_skipped.connect(duplicate, sender=app, weak=False)
    signals.handler_failed.connect(failed, sender=app, weak=False)
    signals.signature_rejected.connect(rejected, sender=app, weak=False)
    signals.payload_rejected.connect(rejected, sender=app, weak=False)
