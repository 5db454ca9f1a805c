"""Every exception and warning flask-ploints raises, under one base.

Catch :class:`PlointsError` for any of them; each is also exported from the
module that raises it, and the ones an app meets at run time from
:mod:`flask_ploints` itself.

.. versionadded:: 0.2
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeliveryLogError",
    "DispatchError",
    "HandlerError",
    "InvalidEvent",
    "PayloadError",
    "PlointsError",
    "PlointsWarning",
    "SecretLookupError",
    "StoreError",
]


class PlointsError(Exception):
    """The base of every exception flask-ploints raises."""


class ConfigError(PlointsError, ValueError):
    """A configuration value is missing or wrong. The message names the key."""


class InvalidEvent(PlointsError, ValueError):
    """A verified body that is not a Ploints event. The message is safe to
    return to the client: it never quotes the body.
    """


class PayloadError(PlointsError, ValueError):
    """Event data does not fit a handler's model."""


class StoreError(PlointsError):
    """The dedupe store could not be reached or did not answer. The receiver
    answers ``503`` so that the sender retries later.
    """


class DispatchError(PlointsError):
    """The event could not be handed over for processing (a broker down).
    Nothing ran; the receiver answers ``503``.
    """


class HandlerError(PlointsError):
    """A handler raised; the original exception is the ``__cause__``."""


class DeliveryLogError(PlointsError):
    """The delivery log's database refused or could not be reached."""


class SecretLookupError(PlointsError):
    """The app's secret lookup of an endpoint for many accounts raised, or
    returned something that is not a secret, a list of them or ``None``.

    .. versionadded:: 0.2
    """


class PlointsWarning(UserWarning):
    """A setting works but is risky: a development-only store, a retention
    too short for the sender's retries.
    """
