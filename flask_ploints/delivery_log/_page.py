"""The delivery log page: recent deliveries, one event's payload and
traceback, and a button that runs a failed event again.

Every request of the page first passes the app's access check and, for a
form, the CSRF check. The pages are rendered on the server from the
templates in ``flask_ploints/delivery_log/templates/ploints/``; an app can
override them by putting its own ``ploints/*.html`` in its template folder.

.. versionadded:: 0.2
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
import typing as t

from flask import Blueprint
from flask import Response
from flask import abort
from flask import current_app
from flask import g
from flask import render_template
from flask import request
from flask import session
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from .._compat import exempt_from_csrf
from .._errors import DeliveryLogError
from ._chart import chart
from ._filters import View
from ._filters import check_values
from ._filters import parse_view
from ._state import page_state
from ._storage import DeliveryLog
from ._table import MAX_ID
from ._table import OUTCOMES
from ._table import Delivery

__all__ = ["CSRF_FIELD", "CSRF_SESSION_KEY", "PAGE_SIZE", "blueprint"]

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
