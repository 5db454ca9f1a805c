"""The delivery log page: the list of recent deliveries (filtered by a
view, which its URL gives, so that a view can be shared), one event's
payload and traceback, re-running one failed delivery or many, and
exporting a view as CSV or JSON.

Every request of the page first passes the app's access check and, for a
form, the CSRF check, and acts only on the rows of the accounts the check
admits. The pages are rendered on the server from the templates in
``flask_ploints/delivery_log/templates/ploints/``; an app can override them
by putting its own ``ploints/*.html`` in its template folder.

.. versionadded:: 0.2
"""

from __future__ import annotations

import csv
import datetime
import hmac
import io
import json
import logging
import re
import secrets
import time
import typing as t
from collections import Counter
from dataclasses import dataclass

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import abort
from flask import current_app
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from .._compat import exempt_from_csrf
from .._errors import DeliveryLogError
from .._errors import DispatchError
from .._errors import StoreError
from .._logfields import delivery_fields
from .._outcomes import Outcome
from .._state import receivers
from ..replay import rerun as rerun_body
from ._chart import chart
from ._query import Filters
from ._state import page_state
from ._storage import DeliveryLog
from ._table import MAX_ID
from ._table import OUTCOMES
from ._table import Delivery

__all__ = [
    "CSRF_FIELD",
    "CSRF_SESSION_KEY",
    "EXPORT_FIELDS",
    "EXPORT_LIMIT",
    "MAX_QUERY",
    "PAGE_SIZE",
    "View",
    "blueprint",
    "parse_view",
]

logger = logging.getLogger("flask_ploints")

#: The session key of the CSRF token.
CSRF_SESSION_KEY = "_ploints_csrf"
#: The form field of the CSRF token.
CSRF_FIELD = "csrf_token"
#: Rows on one page of the list.
PAGE_SIZE = 50
#: Seconds back that the list counts the rejected requests it hides.
REJECTED_WINDOW = 24 * 3600
#: The most deliveries one bulk re-run runs.
MAX_RERUN = 50

#: The page's blueprint, registered by
#: :func:`~flask_ploints.delivery_log._configure.init_delivery_log` under
#: ``PLOINTS_DELIVERY_LOG_URL``; its templates are ``ploints/*.html``.
blueprint = Blueprint("ploints_delivery_log", __name__, template_folder="templates")


@blueprint.url_value_preprocessor
def _exempt_from_app_csrf(endpoint: str | None, values: dict[str, t.Any] | None) -> None:
    # The page checks its own token (_check_csrf); Flask-WTF's CSRFProtect,
    # if the app has one, would refuse that token. A URL value preprocessor
    # runs before every before_request function, the CSRFProtect's included;
    # on every request, since this one blueprint serves every app.
    exempt_from_csrf(current_app._get_current_object(), blueprint)  # type: ignore[attr-defined]


@blueprint.before_request
def _check_access() -> BaseResponse | None:
    # Only True grants: a check written as ``is_authenticated or
    # redirect(...)`` returns its redirect, which the visitor gets. An
    # exception propagates to the app's own error handling, and grants
    # nothing.
    state = page_state()
    answer = state.access(None) if state.scoped else state.access()
    if isinstance(answer, BaseResponse):
        return answer
    if answer is not True and not state.scoped:
        abort(403)
    # A scoped check that does not admit every account is asked about each
    # account the request would show or act on.
    g.ploints_every_account = answer is True
    if request.method == "POST":
        _check_csrf()
    return None


def _every_account() -> bool:
    return bool(g.get("ploints_every_account", False))


def _admits(account: str | None) -> bool:
    """Whether the access check admits the rows of ``account``; rows of no
    account (of an endpoint of one account, and rejected requests) only to
    a check that admits every account.
    """
    if _every_account():
        return True
    return account is not None and page_state().access(account) is True


def _visible(delivery: Delivery) -> bool:
    if delivery.outcome == "rejected":
        return _every_account()
    return _admits(delivery.account)


def _admitted_accounts(log: DeliveryLog, account: str | None) -> list[str] | None:
    """The accounts whose rows the request may show: ``None`` for every
    one; else those the check admits, of ``account`` or of all present.
    """
    if _every_account():
        return None
    candidates = [account] if account is not None else log.accounts()
    return [name for name in candidates if _admits(name)]


def _csrf_token() -> str:
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def _check_csrf() -> None:
    expected = session.get(CSRF_SESSION_KEY)
    given = request.form.get(CSRF_FIELD)
    if not isinstance(expected, str) or not expected or not given:
        abort(400, "The form's CSRF token is missing: reload the page and try again.")
    if not hmac.compare_digest(expected.encode(), given.encode()):
        abort(400, "The form's CSRF token is wrong: reload the page and try again.")


@blueprint.after_request
def _headers(response: Response) -> Response:
    nonce = g.get("ploints_nonce", "")
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    )
    # Payloads hold customers' data: kept out of caches and other sites.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    return response


@blueprint.errorhandler(DeliveryLogError)
def _unavailable(error: DeliveryLogError) -> tuple[str, int]:
    logger.error("the delivery log page could not read its database: %s", error)
    return _render(
        "ploints/error.html",
        title="503 Service Unavailable",
        error=ServiceUnavailable("The delivery log's database is unavailable; try again later."),
    ), 503


@blueprint.errorhandler(HTTPException)
def _error(error: HTTPException) -> tuple[str, int]:
    return _render(
        "ploints/error.html", title=f"{error.code} {error.name}", error=error
    ), error.code or 500


def _format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 0.0001:
        return "< 0.1 ms"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _render(template: str, **context: t.Any) -> str:
    g.ploints_nonce = secrets.token_urlsafe(16)
    return render_template(
        template,
        nonce=g.ploints_nonce,
        csrf_field=CSRF_FIELD,
        csrf_token=_csrf_token,
        format_time=_format_time,
        format_duration=_format_duration,
        several_instances=len(current_app.extensions.get("ploints", {})) > 1,
        many_accounts=any(
            receiver.settings.accounts is not None
            for receiver in current_app.extensions.get("ploints", {}).values()
        ),
        **context,
    )


def _checked(delivery_id: int) -> int:
    checked = _row_id(delivery_id)
    assert checked is not None
    return checked


def _row_id(value: int | str | None) -> int | None:
    """A row id from the URL, or a ``404`` for one no row can have."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        abort(404)
    if not 1 <= number <= MAX_ID:
        abort(404)
    return number


# The view: every filter is a query parameter.


#: Longest ``q`` searched for, in characters.
MAX_QUERY = 200
#: Longest value of any other parameter; an account is at most 128.
MAX_VALUE = 256
#: The parameters a view is made of, as they appear in its URL.
VIEW_PARAMETERS = ("q", "type", "outcome", "account", "since", "until")

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DAY = 86400.0


@dataclass(frozen=True)
class View:
    """The filters of one view of the log, parsed and checked."""

    event_type: str | None = None
    outcome: str | None = None
    account: str | None = None
    q: str | None = None
    since: float | None = None
    until: float | None = None
    since_text: str | None = None
    until_text: str | None = None

    @property
    def filtered(self) -> bool:
        """Whether any filter is set."""
        return any(value is not None for value in self.args().values())

    def args(self) -> dict[str, t.Any]:
        """The view's query parameters (``None`` for those unset), for
        ``url_for``.
        """
        return {
            "q": self.q,
            "type": self.event_type,
            "outcome": self.outcome,
            "account": self.account,
            "since": self.since_text,
            "until": self.until_text,
        }

    def filters(self, **more: t.Any) -> Filters:
        """The view's ``Filters``, with ``more`` of them."""
        values: dict[str, t.Any] = {
            "event_type": self.event_type,
            "outcome": self.outcome,
            "account": self.account,
            "q": self.q,
            "since": self.since,
            "until": self.until,
        }
        values.update(more)
        return Filters(**values)


def _time(name: str, text: str, *, end: bool) -> float:
    """Seconds since the epoch of an ISO 8601 date or date-time, in UTC
    unless it names its offset; the end of a date given as ``until``.
    """
    try:
        if _DATE.fullmatch(text):
            day = datetime.datetime.combine(
                datetime.date.fromisoformat(text), datetime.time(), datetime.UTC
            )
            return day.timestamp() + (_DAY if end else 0.0)
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    except (ValueError, OverflowError):
        abort(
            400,
            f"{name} must be an ISO 8601 date or date-time in UTC, such as 2026-12-07 or"
            " 2026-12-07T09:30:00.",
        )


def check_values(values: MultiDict[str, str]) -> None:
    """Answer ``400`` for a value no view can have: a NUL, or one longer
    than any filter.
    """
    for name, value in values.items(multi=True):
        longest = MAX_QUERY if name == "q" else MAX_VALUE
        if "\x00" in value:
            abort(400, f"The parameter {name[:40]!r} holds a NUL character.")
        if len(value) > longest and (name in VIEW_PARAMETERS or name == "before"):
            abort(400, f"The parameter {name!r} is longer than {longest} characters.")


def parse_view(values: MultiDict[str, str], event_types: t.Collection[str]) -> View:
    """The view that ``values`` (the query string, or a form) describe.

    An unknown event type or outcome is no filter, as a select would send;
    a time that is not ISO 8601, or a period that ends before it starts,
    is a ``400``.
    """
    check_values(values)
    event_type = values.get("type") or None
    outcome = values.get("outcome") or None
    since_text = (values.get("since") or "").strip() or None
    until_text = (values.get("until") or "").strip() or None
    since = None if since_text is None else _time("since", since_text, end=False)
    until = None if until_text is None else _time("until", until_text, end=True)
    if since is not None and until is not None and since >= until:
        abort(400, "The period's since is not before its until.")
    return View(
        event_type=event_type if event_type in event_types else None,
        outcome=outcome if outcome in OUTCOMES else None,
        # Free text: a platform's accounts are too many for a list.
        account=values.get("account") or None,
        q=(values.get("q") or "").strip() or None,
        since=since,
        until=until,
        since_text=since_text,
        until_text=until_text,
    )


def current_view(
    log: DeliveryLog, values: t.Any = None
) -> tuple[View, list[str] | None, list[str]]:
    """The view the request asks for (its query string, or ``values``),
    the accounts the access check admits to it (``None``: every one), and
    their event types.
    """
    values = request.args if values is None else values
    check_values(values)
    admitted = _admitted_accounts(log, values.get("account") or None)
    event_types = log.event_types(admitted)
    return parse_view(values, event_types), admitted, event_types


def shown_outcomes(view: View) -> list[str] | None:
    """The outcomes a view lists: rejected requests only when filtered for,
    so that a flood of forged ones cannot push real deliveries off the page.
    """
    return None if view.outcome is not None else [name for name in OUTCOMES if name != "rejected"]


@blueprint.get("", strict_slashes=False)
def index() -> str:
    """The list of recent deliveries, newest first, filtered by the query
    parameters ``q`` (a substring of the event id or of a payload value),
    ``since`` and ``until`` (ISO 8601, UTC), ``type``, ``outcome`` and
    ``account``; ``before`` (a row id) pages back. Above it, the chart of
    the period's outcomes.
    Rejected requests are listed only when filtered for; the page says how
    many there were in the last day.
    """
    log = page_state().log
    view, admitted, event_types = current_view(log)
    before = _row_id(request.args.get("before"))
    filters = view.filters(accounts=admitted)
    rows = log.recent(
        PAGE_SIZE + 1,
        view.event_type,
        view.outcome,
        before=before,
        outcomes=shown_outcomes(view),
        account=view.account,
        accounts=admitted,
        q=view.q,
        since=view.since,
        until=view.until,
    )
    older = rows[PAGE_SIZE - 1].id if len(rows) > PAGE_SIZE else None
    hidden = 0
    if not view.filtered and admitted is None:
        hidden = log.count("rejected", since=time.time() - REJECTED_WINDOW)
    return _render(
        "ploints/deliveries.html",
        title="Deliveries",
        deliveries=rows[:PAGE_SIZE],
        event_types=event_types,
        outcomes=OUTCOMES,
        view=view,
        event_type=view.event_type,
        outcome=view.outcome,
        account=view.account,
        older=older,
        paged=before is not None,
        hidden_rejected=hidden,
        chart=chart(log, filters),
        max_rerun=MAX_RERUN,
    )


def _pretty(payload: bytes) -> str:
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except ValueError:
        return payload.decode("utf-8", "replace")


def _shown(log: DeliveryLog, delivery_id: int) -> Delivery:
    """The row ``delivery_id``, or a ``404`` if there is none or the access
    check does not admit its account: the same answer, so that ids of
    other accounts cannot be probed.
    """
    delivery = log.get(_checked(delivery_id))
    if delivery is None or not _visible(delivery):
        abort(404)
    return delivery


@blueprint.get("/<int:delivery_id>")
def detail(delivery_id: int) -> str:
    """One delivery: its payload, its traceback, the other deliveries of the
    same event, and the re-run button when it failed.
    """
    log = page_state().log
    delivery = _shown(log, delivery_id)
    history: list[Delivery] = []
    if delivery.event_id is not None:
        # The same id from another account is another event.
        history = log.recent(PAGE_SIZE, event_id=delivery.event_id, account=delivery.account)
    return _render(
        "ploints/delivery.html",
        title=delivery.event_id or f"Delivery {delivery.id}",
        delivery=delivery,
        payload=None if delivery.payload is None else _pretty(delivery.payload),
        history=history,
    )


# Re-runs and exports.


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
