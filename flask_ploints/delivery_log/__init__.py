"""The delivery log: every delivery outcome recorded in a SQL table, and a
page that lists them, shows one event's payload and traceback, and runs a
failed event again.

Off unless ``PLOINTS_DELIVERY_LOG`` is set; only then does
:meth:`~flask_ploints.PlointsWebhooks.init_app` import this package (and
SQLAlchemy with it), record every delivery of the app in a
:class:`DeliveryLog` and serve the page at ``PLOINTS_DELIVERY_LOG_URL``. It
refuses to start without an access check (``PLOINTS_DELIVERY_LOG_ACCESS``,
called before every request of the page: only ``True`` grants, a response
is what the visitor gets, anything else answers ``403``) and
without ``SECRET_KEY``, which signs the session that holds the page's CSRF
token. See :doc:`/delivery-log`.

.. versionadded:: 0.2
"""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the delivery log needs SQLAlchemy 2; install it with:"
        ' pip install "flask-ploints[sqlalchemy]"'
    ) from exc

from ._state import delivery_log
from ._storage import DeliveryLog
from ._table import Delivery

__all__ = ["Delivery", "DeliveryLog", "delivery_log"]
