"""The ``flask ploints`` command group and what its commands share.

.. versionadded:: 0.2
"""

from __future__ import annotations

import math

import click
from flask import Flask
from flask import current_app
from flask.cli import AppGroup

from ..state import Receiver
from ..state import receiver_for

__all__ = ["current_flask_app", "finite", "name_option", "ploints", "receiver_named"]

ploints = AppGroup("ploints", help="Send, sign and inspect Ploints webhooks.")

#: The ``--name`` option: which instance a command works on.
name_option = click.option(
    "--name",
    default="ploints",
    show_default=True,
    help="Which PlointsWebhooks instance of the app.",
)


def current_flask_app() -> Flask:
    """Return the app the command runs for, unproxied."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    return app


def receiver_named(name: str) -> Receiver:
    """Return instance ``name``'s state, or end the command with a one-line
    error.
    """
    try:
        return receiver_for(current_flask_app(), name)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


def finite(option: str, value: float) -> float:
    """Refuse ``nan`` and ``inf``, which click's ranges let through."""
    if not math.isfinite(value):
        raise click.ClickException(f"{option} must be a finite number, not {value}")
    return value
