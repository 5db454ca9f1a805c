"""What each :class:`~flask_ploints.PlointsWebhooks` instance set up on an
app, and the one lookup of it.

A leaf of the request path: the extension writes this state, and the
endpoint, replay, the Celery task, the CLI and the test client read it,
without any of them importing the extension.

.. versionadded:: 0.2
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask
from flask import current_app

from .config import Settings
from .dispatch import Dispatcher
from .dispatch import Handlers
from .processing import Processor
from .stores import DedupeStore

__all__ = ["EXTENSION_KEY", "Receiver", "receiver_for", "receivers"]

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
