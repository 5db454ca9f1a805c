"""The ``flask ploints`` command group and what its commands share.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import logging
import math
import typing as t

import click
from flask import Flask
from flask import current_app
from flask.cli import AppGroup

from .._errors import ConfigError
from .._state import Receiver
from .._state import receiver_for

__all__ = [
    "current_flask_app",
    "finite",
    "logged",
    "name_option",
    "ploints",
    "receiver_named",
    "summary",
]


class _Group(AppGroup):
    """Commands that end a configuration mistake with its one line: the app
    they load may refuse to start (a missing secret, a wrong key).
    """

    def invoke(self, ctx: click.Context) -> t.Any:
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            raise click.ClickException(str(error)) from None


ploints = _Group("ploints", help="Send, sign and inspect Ploints webhooks.")

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


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def logged() -> t.Iterator[list[logging.LogRecord]]:
    """Collect what the library logs at ``WARNING`` and above in the block,
    for :func:`summary`. The records still reach the app's own handlers;
    without any, Python would print each with its traceback.
    """
    collect = _Collect()
    logger = logging.getLogger("flask_ploints")
    logger.addHandler(collect)
    try:
        yield collect.records
    finally:
        logger.removeHandler(collect)


def summary(records: list[logging.LogRecord]) -> str:
    """Return the gravest of ``records`` as `` (message: error)``, to end a
    command's line; empty when there is none.
    """
    if not records:
        return ""
    worst = max(records, key=lambda record: record.levelno)
    text = worst.getMessage()
    error = worst.exc_info[1] if worst.exc_info else None
    if error is not None and repr(error) not in text:
        # The first line only: a database error goes on with its statement.
        lines = str(error).strip().splitlines()
        text += f": {type(error).__name__}" + (f": {lines[0]}" if lines else "")
    return f" ({text})"
