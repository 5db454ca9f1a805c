"""Receive Ploints webhooks in Flask: verified, deduplicated, dispatched to
your handlers.
"""

from __future__ import annotations

from importlib.metadata import version as _version

from .config import ConfigError
from .config import PlointsWarning
from .events import EVENT_TYPES
from .events import Event
from .extension import PlointsWebhooks
from .signals import on

__all__ = ["EVENT_TYPES", "ConfigError", "Event", "PlointsWarning", "PlointsWebhooks", "on"]

__version__ = _version("flask-ploints")
