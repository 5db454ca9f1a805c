"""Receive Ploints webhooks in Flask: verified, deduplicated, dispatched to
your handlers.
"""

from __future__ import annotations

from importlib.metadata import version as _version

from .errors import ConfigError
from .errors import DeliveryLogError
from .errors import DispatchError
from .errors import HandlerError
from .errors import InvalidEvent
from .errors import PayloadError
from .errors import PlointsError
from .errors import PlointsWarning
from .errors import StoreError
from .events import EVENT_TYPES
from .events import Event
from .extension import PlointsWebhooks
from .signals import on

__all__ = [
    "EVENT_TYPES",
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
    "StoreError",
    "on",
]

__version__ = _version("flask-ploints")
