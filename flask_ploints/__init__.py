"""Receive Ploints webhooks in Flask: verified, deduplicated, dispatched to
your handlers.
"""

from __future__ import annotations

import typing as _t
from importlib.metadata import version as _version

from .accounts import Account
from .effects import after_commit
from .errors import ConfigError
from .errors import DeliveryLogError
from .errors import DispatchError
from .errors import HandlerError
from .errors import InvalidEvent
from .errors import PayloadError
from .errors import PlointsError
from .errors import PlointsWarning
from .errors import SecretLookupError
from .errors import StoreError
from .events import EVENT_TYPES
from .events import Event
from .extension import PlointsWebhooks
from .signals import on

if _t.TYPE_CHECKING:
    from .stores.session import current_session

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
        from .stores.session import current_session

        return current_session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
