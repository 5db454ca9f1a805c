"""The delivery log's per-app state and its one lookup. A leaf: it imports
nothing of the package above it.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from flask import Flask
from flask import current_app

if t.TYPE_CHECKING:
    from ._storage import DeliveryLog

__all__ = ["EXTENSION_KEY", "DeliveryLogPage", "delivery_log", "page_state"]

#: Where the page's state is kept in ``app.extensions``.
EXTENSION_KEY = "ploints_delivery_log"


@dataclass(frozen=True)
class DeliveryLogPage:
    """The delivery log set up on one app, kept in
    ``app.extensions["ploints_delivery_log"]``.

    :param log: where deliveries are recorded and read from.
    :param access: the app's access check.
    :param url: where the page is served.
    :param scoped: whether ``access`` takes the account it is asked about
        (``access(account)``), or none (all or nothing).
    """

    log: DeliveryLog
    access: t.Callable[..., object]
    url: str
    scoped: bool = False


def delivery_log(app: Flask | None = None) -> DeliveryLog:
    """Return the delivery log of ``app`` (default: the current app).

    :raises RuntimeError: the delivery log is off on the app.
    """
    return page_state(app).log


def page_state(app: Flask | None = None) -> DeliveryLogPage:
    """Return the delivery log's state on ``app`` (default: the current
    app).

    :raises RuntimeError: the delivery log is off on the app.
    """
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    state: DeliveryLogPage | None = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError(
            f"the delivery log is off on app {app.name!r}: set PLOINTS_DELIVERY_LOG before"
            " calling PlointsWebhooks.init_app(app)"
        )
    return state
