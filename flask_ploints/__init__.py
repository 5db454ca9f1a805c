"""Receive Ploints webhooks in Flask: verified, deduplicated, dispatched to
your handlers.
"""

from __future__ import annotations

import typing as _t
from importlib.metadata import version as _version

from ._accounts import Account
from ._effects import after_commit
from ._errors import ConfigError
from ._errors import DeliveryLogError
from ._errors import DispatchError
from ._errors import HandlerError
from ._errors import InvalidEvent
from ._errors import PayloadError
from ._errors import PlointsError
from ._errors import PlointsWarning
from ._errors import SecretLookupError
from ._errors import StoreError
from ._events import EVENT_TYPES
from ._events import Event
from ._extension import PlointsWebhooks
from .signals import on

if _t.TYPE_CHECKING:
    from .stores._session import current_session

__all__ = [
    "EVENT_TYPES",
    "Account",
    "ConfigError",
    "DeliveryLogError",
    "DispatchError",
    "Event",
    "HandlerError",
    "InvalidEvent",
    "PayloadError",
    "PlointsError",
    "PlointsWarning",
    "PlointsWebhooks",
    "SecretLookupError",
    "StoreError",
    "after_commit",
    "current_session",
    "on",
]

__version__ = _version("flask-ploints")


def __getattr__(name: str) -> _t.Any:
    # current_session belongs to the SessionStore, which imports SQLAlchemy,
    # an optional extra.
    if name == "current_session":
        from .stores._session import current_session

        return current_session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
