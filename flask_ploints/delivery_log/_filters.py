"""The delivery log page's view, as its URL (or a form) gives it: every
filter is a query parameter, so that a view can be shared.

.. versionadded:: 0.2
"""

from __future__ import annotations

import datetime
import re
import typing as t
from dataclasses import dataclass

from flask import abort
from werkzeug.datastructures import MultiDict

from ._query import Filters
from ._table import OUTCOMES

__all__ = ["MAX_QUERY", "View", "parse_view"]

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
        """The view's :class:`~.query.Filters`, with ``more`` of them."""
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
