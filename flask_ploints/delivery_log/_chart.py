"""The list page's chart: the outcomes over the period shown, drawn as an
inline SVG on the server (no script: the page's CSP is
``default-src 'none'``; the bars' colours come from the page's style sheet,
by class).

.. versionadded:: 0.2
"""

from __future__ import annotations

import time
import typing as t
from dataclasses import dataclass
from dataclasses import field

from ._table import OUTCOMES

if t.TYPE_CHECKING:
    from ._query import Filters
    from ._storage import DeliveryLog

__all__ = ["BUCKETS", "Chart", "chart"]

#: Bars of the chart.
BUCKETS = 24
#: The period shown when the view names none: the last day.
DEFAULT_PERIOD = 86400.0

# The drawing's size in its own units; it scales to the page's width.
WIDTH = 720
HEIGHT = 126
PLOT_TOP = 8
PLOT_BOTTOM = 125
PLOT_LEFT = 4
PLOT_RIGHT = 716


@dataclass(frozen=True)
class Bar:
    outcome: str
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Chart:
    """What the template draws: bars, the period's bounds, and counts."""

    start: float
    end: float
    bars: list[Bar] = field(default_factory=list)
    #: Rows of each outcome of ``OUTCOMES`` in the period.
    totals: dict[str, int] = field(default_factory=dict)
    #: ``failed`` over ``processed`` and ``failed``; ``None`` without either.
    failure_rate: float | None = None
    width: int = WIDTH
    height: int = HEIGHT
    baseline: int = PLOT_BOTTOM


def period(since: float | None, until: float | None, now: float) -> tuple[float, float]:
    """The period the chart draws: the view's, or its last day up to now
    (or up to ``until``).
    """
    end = until if until is not None else now
    start = since if since is not None else end - DEFAULT_PERIOD
    if end <= start:  # a since in the future, without an until
        end = start + DEFAULT_PERIOD
    return start, end


def _stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch))


def chart(log: DeliveryLog, filters: Filters, now: float | None = None) -> Chart:
    """Count and draw the outcomes of the rows ``filters`` select, but for
    their outcome, over their period.
    """
    start, end = period(filters.since, filters.until, time.time() if now is None else now)
    width = (end - start) / BUCKETS
    counts = log._histogram(filters, start, width, BUCKETS)
    totals = {outcome: sum(counts.get(outcome, [])) for outcome in OUTCOMES}
    highest = max(
        (sum(counts.get(o, [0] * BUCKETS)[i] for o in OUTCOMES) for i in range(BUCKETS)),
        default=0,
    )
    slot = (PLOT_RIGHT - PLOT_LEFT) / BUCKETS
    scale = (PLOT_BOTTOM - PLOT_TOP) / highest if highest else 0.0
    bars: list[Bar] = []
    for index in range(BUCKETS):
        y = float(PLOT_BOTTOM)
        for outcome in OUTCOMES:
            count = counts.get(outcome, [0] * BUCKETS)[index]
            if not count:
                continue
            height = count * scale
            y -= height
            bucket_start = start + index * width
            bars.append(
                Bar(
                    outcome=outcome,
                    x=round(PLOT_LEFT + index * slot + 1, 2),
                    y=round(y, 2),
                    width=round(slot - 2, 2),
                    height=round(height, 2),
                    title=f"{count} {outcome}, {_stamp(bucket_start)} to"
                    f" {_stamp(bucket_start + width)} UTC",
                )
            )
    finished = totals["processed"] + totals["failed"]
    rate = totals["failed"] / finished if finished else None
    return Chart(start=start, end=end, bars=bars, totals=totals, failure_rate=rate)
