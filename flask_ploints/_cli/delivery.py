"""The commands that deliver events: ``send``, ``sign``, ``events`` and
``simulate``.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import typing as t
import urllib.error
import urllib.request

import click
from flask import current_app

from .._config import SENDER_RETRY_SCHEDULE as RETRY_SCHEDULE
from .._errors import SecretLookupError
from .._events import EVENT_TYPES
from .._events import InvalidEvent
from .._events import parse_event
from .._samples import build_event
from .._signature import SIGNATURE_HEADER
from .._signature import sign
from .._state import Receiver
from .._state import delivery_target
from ..signals import signal_for
from .group import current_flask_app
from .group import finite
from .group import logged
from .group import name_option
from .group import ploints
from .group import receiver_named
from .group import summary
from .http import OPENER
from .http import check_url

__all__ = ["events_command", "send_command", "sign_command", "simulate_command"]


def _target(receiver: Receiver, account: str | None) -> tuple[str, str]:
    """The endpoint's URL path and the current secret, of ``account`` on an
    endpoint for many accounts; a one-line error for a wrong ``--account``.
    """
    try:
        return delivery_target(current_flask_app(), receiver, account)
    except ValueError as error:
        raise click.ClickException(f"--account: {error}") from None
    except SecretLookupError as error:
        raise click.ClickException(str(error)) from None


def _post(
    url: str | None, target: tuple[str, str], body: bytes, timeout: float = 10.0
) -> tuple[int, str]:
    path, secret = target
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)}
    if url is None:
        with logged() as records:
            response = current_app.test_client().post(path, data=body, headers=headers)
        return response.status_code, response.get_data(as_text=True).strip() + summary(records)
    check_url("--url", url)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with OPENER.open(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode("utf-8", "replace").strip()
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise click.ClickException(f"cannot reach {url}: {reason}") from None


def _event_type(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value not in EVENT_TYPES:
        raise click.ClickException(f"unknown event type {value!r}; known: {', '.join(EVENT_TYPES)}")
    return value


def _load_data(data: str | None, data_file: t.BinaryIO | None) -> dict[str, t.Any] | None:
    if data is not None and data_file is not None:
        raise click.ClickException("give --data or --data-file, not both")
    if data_file is not None:
        try:
            data = data_file.read().decode("utf-8")
        except UnicodeDecodeError:
            raise click.ClickException("--data-file is not UTF-8") from None
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise click.ClickException(f"--data is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise click.ClickException("--data must be a JSON object")
    return value


def _event_body(
    event_type: str, data: str | None, data_file: t.BinaryIO | None, event_id: str | None
) -> bytes:
    body = json.dumps(build_event(event_type, _load_data(data, data_file), id=event_id)).encode()
    try:
        # The endpoint's own parser: what it would answer 400 is refused here.
        parse_event(body)
    except InvalidEvent as error:
        raise click.ClickException(f"not a valid event: {error}") from None
    return body


_Command = t.TypeVar("_Command", bound=t.Callable[..., t.Any])


def _event_options(func: _Command) -> _Command:
    """The TYPE argument and the options that build the event to deliver."""
    for decorator in reversed(
        [
            click.argument("event_type", metavar="TYPE", callback=_event_type),
            click.option(
                "--data", help="The event's data as a JSON object (default: sample data)."
            ),
            click.option(
                "--data-file", type=click.File("rb"), help="Read the data from a JSON file."
            ),
            click.option("--id", "event_id", help="The event id (default: a fresh one)."),
        ]
    ):
        func = decorator(func)
    return func


_account_option = click.option(
    "--account",
    help="On an endpoint for many accounts: post to this account's URL, signed with its"
    " current secret from the lookup.",
)


@ploints.command("send")
@_event_options
@click.option("--url", help="Post over HTTP to this URL instead of to the app in process.")
@_account_option
@name_option
def send_command(
    event_type: str,
    data: str | None,
    data_file: t.BinaryIO | None,
    event_id: str | None,
    url: str | None,
    account: str | None,
    name: str,
) -> None:
    """Sign a sample event of TYPE with the current secret and deliver it."""
    target = _target(receiver_named(name), account)
    body = _event_body(event_type, data, data_file, event_id)
    status, answer = _post(url, target, body)
    click.echo(f"{status} {answer}")
    if not 200 <= status < 300:
        sys.exit(1)


@ploints.command("sign")
@click.argument("source", type=click.File("rb"), default="-")
@_account_option
@name_option
def sign_command(source: t.BinaryIO, account: str | None, name: str) -> None:
    """Print the X-Ploints-Signature of a body read from SOURCE (a file, or
    - for standard input) under the current secret.
    """
    _, secret = _target(receiver_named(name), account)
    click.echo(sign(source.read(), secret))


def _describe(func: t.Callable[..., t.Any]) -> str:
    wrapped = getattr(func, "__wrapped__", func)
    module = getattr(wrapped, "__module__", None) or "?"
    return f"{module}.{getattr(wrapped, '__qualname__', repr(wrapped))}"


@ploints.command("events")
@name_option
def events_command(name: str) -> None:
    """List the event types and the handlers connected to each."""
    receiver = receiver_named(name)
    app = current_flask_app()
    for event_type in EVENT_TYPES:
        handlers = [_describe(func) for func in receiver.handlers.for_type(event_type)]
        signal = signal_for(event_type)
        assert signal is not None
        handlers += [f"{_describe(func)} (signal)" for func in signal.receivers_for(app)]
        click.echo(f"{event_type:<22} {', '.join(handlers) or '-'}")
    any_handlers = [_describe(func) for func in receiver.handlers.for_any()]
    click.echo(f"{'(every event)':<22} {', '.join(any_handlers) or '-'}")


@ploints.command("simulate")
@_event_options
@click.option("--url", help="Deliver over HTTP to this URL instead of to the app in process.")
@click.option(
    "--speed",
    type=click.FloatRange(min=1, min_open=False),
    callback=lambda ctx, param, value: finite("--speed", value),
    default=3600.0,
    show_default=True,
    help="Divide the sender's retry delays by this.",
)
@click.option(
    "--fail-first",
    type=click.IntRange(min=0, max=len(RETRY_SCHEDULE) - 1),
    default=0,
    show_default=True,
    help="Count the first K answers as lost (a timeout), even a 2xx, so the event is retried.",
)
@_account_option
@name_option
def simulate_command(
    event_type: str,
    data: str | None,
    data_file: t.BinaryIO | None,
    event_id: str | None,
    url: str | None,
    speed: float,
    fail_first: int,
    account: str | None,
    name: str,
) -> None:
    """Deliver one event the way Ploints does: the same body again on the
    retry schedule (+1 min, +5 min, +30 min, +2 h, +12 h, divided by
    --speed) until an answer counts as a 2xx.
    """
    # The lookup is asked once: each attempt is the same signed body.
    target = _target(receiver_named(name), account)
    body = _event_body(event_type, data, data_file, event_id)
    for attempt, delay in enumerate(RETRY_SCHEDULE, start=1):
        time.sleep(delay / speed)
        status, answer = _post(url, target, body)
        lost = attempt <= fail_first
        note = " (answer lost: the sender retries)" if lost else ""
        click.echo(f"attempt {attempt} (sender's +{delay} s): {status} {answer}{note}")
        if 200 <= status < 300 and not lost:
            return
    raise click.ClickException("the sender gave up after 6 attempts; the event is marked failed")
