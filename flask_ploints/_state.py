"""What each :class:`~flask_ploints.PlointsWebhooks` instance set up on an
app, and the one lookup of it.

A leaf of the request path: the extension writes this state, and the
endpoint, replay, the Celery task, the CLI and the test client read it,
without any of them importing the extension.

.. versionadded:: 0.2
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from flask import Flask
from flask import current_app

from ._accounts import url_value
from ._config import Settings
from ._dispatch import Dispatcher
from ._dispatch import Handlers
from ._processing import Processor
from .stores import DedupeStore

__all__ = [
    "EXTENSION_KEY",
    "Receiver",
    "delivery_target",
    "delivery_url",
    "receiver_for",
    "receivers",
]

#: Where the instances' state is kept: ``app.extensions["ploints"][name]``.
EXTENSION_KEY = "ploints"


@dataclass(frozen=True)
class Receiver:
    """What one :class:`~flask_ploints.PlointsWebhooks` instance set up on
    one app, kept in ``app.extensions["ploints"][name]``.
    """

    #: The instance's name.
    name: str
    #: Its checked settings. Their ``repr`` leaves the secrets out.
    settings: Settings
    #: Where its event ids are claimed.
    store: DedupeStore
    #: Where its claimed events are processed: inline, or on a worker.
    dispatcher: Dispatcher
    #: Its handlers.
    handlers: Handlers
    #: Claim, run, settle and notify, for every way an event is processed.
    processor: Processor


def receivers(app: Flask) -> dict[str, Receiver]:
    """Return every instance's state on ``app`` by name; empty when none is
    registered.
    """
    found: dict[str, Receiver] = app.extensions.get(EXTENSION_KEY, {})
    return found


def receiver_for(app: Flask | None = None, name: str = "ploints") -> Receiver:
    """Return the state of instance ``name`` on ``app`` (default: the
    current app).

    :raises RuntimeError: no instance of that name was registered on the
        app.
    """
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    found = receivers(app)
    try:
        return found[name]
    except KeyError:
        registered = ", ".join(sorted(found)) or "none"
        raise RuntimeError(
            f"PlointsWebhooks {name!r} is not registered on app {app.name!r} (registered:"
            f" {registered}); did you forget to call init_app(app)?"
        ) from None


def delivery_url(app: Flask, receiver: Receiver, account: str | None) -> str:
    """Return the URL path that a delivery to ``receiver`` is posted to: its
    URL, or on an endpoint for many accounts, ``account``'s.

    .. versionadded:: 0.2

    :raises ValueError: ``account`` is given to an instance of one account,
        or missing for one of many.
    """
    settings = receiver.settings
    if settings.accounts is None:
        if account is not None:
            raise ValueError(
                f"PlointsWebhooks {receiver.name!r} serves one account: its URL"
                f" {settings.url!r} has no <account>"
            )
        return settings.url
    if account is None:
        raise ValueError(
            f"PlointsWebhooks {receiver.name!r} serves many accounts ({settings.url!r}):"
            " give the account"
        )
    # The URL map builds (and quotes) the account as the endpoint routes it,
    # without a request context.
    return app.url_map.bind("localhost").build(f"{receiver.name}.receive", {"account": account})


def delivery_target(app: Flask, receiver: Receiver, account: str | None) -> tuple[str, str]:
    """Return :func:`delivery_url` and the secret a delivery is signed with
    (the current one): the instance's own, or ``account``'s from the lookup,
    which is called once.

    .. versionadded:: 0.2

    :raises ValueError: as :func:`delivery_url`, or ``account`` is unknown
        to the lookup.
    :raises flask_ploints._errors.SecretLookupError: the lookup failed.
    """
    url = delivery_url(app, receiver, account)
    accounts = receiver.settings.accounts
    if accounts is None:
        secrets = receiver.settings.secrets_of(account)
    else:
        # The lookup gets what the endpoint will: the URL's converted value.
        value = url_value(app, f"{receiver.name}.receive", unquote(url), account)
        secrets = accounts.secrets(value)
    if not secrets:
        raise ValueError(f"the secret lookup does not know account {account!r}")
    return url, secrets[0]
