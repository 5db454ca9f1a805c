"""The delivery log page's actions: re-running one failed delivery or many
(selected, or all failed in a view) and exporting a view as CSV or JSON.
Each passes the page's access check (and, for a form, its CSRF check)
first, and acts only on the rows of the accounts the check admits.

.. versionadded:: 0.2
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import typing as t
from collections import Counter

from flask import Flask
from flask import Response
from flask import abort
from flask import current_app
from flask import flash
from flask import redirect
from flask import request
from flask import url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from .._errors import DispatchError
from .._errors import StoreError
from .._logfields import delivery_fields
from .._outcomes import Outcome
from .._state import receivers
from ..replay import rerun as rerun_body
from ._filters import View
from ._page import MAX_RERUN
from ._page import _row_id
from ._page import _shown
from ._page import _visible
from ._page import blueprint
from ._page import current_view
from ._page import shown_outcomes
from ._state import page_state
from ._table import Delivery

__all__ = ["EXPORT_FIELDS", "EXPORT_LIMIT"]

logger = logging.getLogger("flask_ploints")

#: The most rows one export holds, newest first.
EXPORT_LIMIT = 10_000
#: The fields of each exported row, in the CSV's column order.
EXPORT_FIELDS = (
    "id",
    "received_at",
    "endpoint",
    "account",
    "event_id",
    "event_type",
    "outcome",
    "status",
    "client",
    "reason",
    "duration",
)
#: How the message of a re-run refused because the event is held ends.
_IN_FLIGHT = "is being processed right now"
# What a spreadsheet would run as a formula at the start of a cell.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _refusal(app: Flask, delivery: Delivery, exc: Exception) -> str:
    receiver = receivers(app).get(delivery.name)
    held = isinstance(exc, ValueError) and str(exc).endswith(_IN_FLIGHT)
    if not held or receiver is None or receiver.dispatcher.runs_inline:
        return str(exc)
    lease = getattr(receiver.dispatcher, "lease", None)
    until = "" if lease is None else f" (PLOINTS_CELERY_LEASE, {lease:g} s from its last attempt)"
    return (
        "a Celery worker holds this event's claim: it is queued, running, or waiting for its"
        f" next attempt, and keeps the claim{until} until the event is processed or the worker"
        " gives up, so that it never runs twice at once. Nothing ran; its attempts are listed"
        " below as they happen. Re-run it once the last one is failed."
    )


def _run(app: Flask, delivery: Delivery) -> tuple[str, str | None]:
    """Run a failed delivery's event again, as :func:`~flask_ploints.replay.rerun`
    does; return its outcome (``refused`` or ``unavailable`` when it did not
    run) and, when it did not, why.
    """
    assert delivery.payload is not None
    try:
        outcome = rerun_body(app, delivery.payload, name=delivery.name, account=delivery.account)
    except (RuntimeError, ValueError) as exc:
        # The instance is gone from the app, the body no longer parses, or a
        # delivery of the event holds its claim right now.
        return "refused", _refusal(app, delivery, exc)
    except (StoreError, DispatchError):
        logger.exception(
            "re-run of event %s could not start",
            delivery.event_id,
            extra=delivery_fields(
                Outcome.UNAVAILABLE,
                event_id=delivery.event_id,
                event_type=delivery.event_type,
                account=delivery.account,
            ),
        )
        return "unavailable", (
            "the dedupe store or the queue is unavailable. Nothing ran; try again later."
        )
    return str(outcome), None


@blueprint.post("/<int:delivery_id>/rerun")
def rerun(delivery_id: int) -> BaseResponse:
    """Run a failed delivery's event again, through the same claim, handlers
    and commit as a delivery; the outcome is flashed and recorded in the log.
    """
    delivery = _shown(page_state().log, delivery_id)
    back = redirect(url_for(".detail", delivery_id=delivery_id), 303)
    if delivery.outcome != "failed" or delivery.payload is None:
        flash("Only a failed delivery can be re-run.", "error")
        return back
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    outcome, why = _run(app, delivery)
    if outcome == "refused":
        flash(f"Re-run of {delivery.event_id} refused: {why}", "error")
    elif outcome == "unavailable":
        flash(f"Re-run of {delivery.event_id} did not start: {why}", "error")
    else:
        category = "error" if outcome == "failed" else "message"
        flash(f"Re-run of {delivery.event_id}: {outcome}.", category)
    return back


def _selected(ids: list[str], view: View, admitted: list[str] | None) -> list[Delivery]:
    """The rows a bulk re-run acts on: those of ``ids`` that the access
    check admits, or, with none, the newest failed ones of ``view`` among
    the ``admitted`` accounts, at most :data:`MAX_RERUN` + 1, so that more
    can be told.
    """
    log = page_state().log
    if ids:
        if len(ids) > MAX_RERUN:
            abort(400, f"At most {MAX_RERUN} deliveries are re-run per request: select fewer.")
        rows: list[Delivery] = []
        for value in ids:
            try:
                number = _row_id(value)
            except HTTPException:  # the 404 of an id no row can have
                continue
            delivery = None if number is None else log.get(number)
            # Rows of accounts the check does not admit are as if absent.
            if delivery is not None and _visible(delivery):
                rows.append(delivery)
        return rows
    if view.outcome not in (None, "failed"):
        return []
    return log.recent(
        MAX_RERUN + 1,
        view.event_type,
        "failed",
        account=view.account,
        accounts=admitted,
        q=view.q,
        since=view.since,
        until=view.until,
    )


def _summary(results: Counter[str], skipped: int, more: bool) -> str:
    ran = sum(results.values())
    parts = ", ".join(f"{count} {name}" for name, count in sorted(results.items()))
    text = f"Re-ran {ran} event{'s' if ran != 1 else ''}{': ' + parts if parts else ''}."
    if skipped:
        text += f" Not run, as not failed or not found: {skipped}."
    if more:
        text += (
            f" This view holds more failed deliveries than the {MAX_RERUN} that one request"
            " re-runs: re-run again, or narrow it with since and until."
        )
    return text


@blueprint.post("/rerun")
def rerun_many() -> BaseResponse:
    """Re-run the selected failed deliveries (the form's ``id`` fields), or
    with ``all`` all failed in the view that the form's other fields name,
    at most :data:`MAX_RERUN`: each as :func:`rerun` does one, an event
    once however many of its deliveries failed. Flash a summary of the
    outcomes, and go back to the view.
    """
    view, admitted, _ = current_view(page_state().log, request.form)
    back = redirect(url_for(".index", **view.args()), 303)
    ids = list(dict.fromkeys(request.form.getlist("id")))
    if not ids and not request.form.get("all"):
        flash("Select the failed deliveries to re-run, or re-run all failed in this view.", "error")
        return back
    rows = _selected(ids, view, admitted)
    more = not ids and len(rows) > MAX_RERUN
    rows = rows[:MAX_RERUN]
    skipped = len(ids) - len(rows) if ids else 0
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    results: Counter[str] = Counter()
    seen: set[tuple[str, str | None, str | None]] = set()
    reasons: list[str] = []
    for delivery in rows:
        if delivery.outcome != "failed" or delivery.payload is None:
            skipped += 1
            continue
        key = (delivery.name, delivery.account, delivery.event_id)
        if key in seen:
            continue
        seen.add(key)
        outcome, why = _run(app, delivery)
        results[outcome] += 1
        if why is not None and len(reasons) < 3:
            reasons.append(f"{delivery.event_id} {outcome}: {why}")
    message = " ".join([_summary(results, skipped, more), *reasons])
    bad = results["failed"] + results["refused"] + results["unavailable"]
    flash(message, "error" if bad else "message")
    return back


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _record(delivery: Delivery) -> dict[str, t.Any]:
    return {
        "id": delivery.id,
        "received_at": _iso(delivery.received_at),
        "endpoint": delivery.name,
        "account": delivery.account,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "outcome": delivery.outcome,
        "status": delivery.status,
        "client": delivery.client,
        "reason": delivery.reason,
        "duration": delivery.duration,
    }


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


@blueprint.get("/export.<any(csv, json):kind>")
def export(kind: str) -> Response:
    """The view's rows (of the same query parameters as the list, but for
    its cursor), newest first, at most :data:`EXPORT_LIMIT`, as CSV or
    JSON; without payloads or tracebacks.
    """
    log = page_state().log
    view, admitted, _ = current_view(log)
    rows = log.recent(
        EXPORT_LIMIT + 1,
        view.event_type,
        view.outcome,
        outcomes=shown_outcomes(view),
        account=view.account,
        accounts=admitted,
        q=view.q,
        since=view.since,
        until=view.until,
    )
    truncated = len(rows) > EXPORT_LIMIT
    records = [_record(row) for row in rows[:EXPORT_LIMIT]]
    name = time.strftime("ploints-deliveries-%Y%m%dT%H%M%SZ", time.gmtime())
    if kind == "json":
        body = json.dumps({"deliveries": records, "truncated": truncated}, indent=1)
        response = Response(body, mimetype="application/json")
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_FIELDS)
        for record in records:
            writer.writerow([_cell(record[field]) for field in EXPORT_FIELDS])
        response = Response(buffer.getvalue(), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}.{kind}"'
    if truncated:
        response.headers["X-Ploints-Truncated"] = str(EXPORT_LIMIT)
    return response
