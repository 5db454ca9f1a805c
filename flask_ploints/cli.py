"""The ``flask ploints`` command group.

Registered through the ``flask.commands`` entry point, so every app that
installs flask-ploints has it. Each command works on one
:class:`~flask_ploints.PlointsWebhooks` instance of the app (``--name``,
default ``ploints``). Every misuse ends in a one-line error and a non-zero
exit status.
"""

from __future__ import annotations

import json
import os
import sys
import time
import typing as t
import urllib.error
import urllib.request

import click
from flask import Flask
from flask import current_app
from flask.cli import AppGroup

from .errors import DispatchError
from .errors import StoreError
from .events import EVENT_TYPES
from .replay import replay
from .samples import build_event
from .sender import RETRY_SCHEDULE
from .signals import signal_for
from .signature import SIGNATURE_HEADER
from .signature import sign
from .state import Receiver
from .state import receiver_for
from .stores import InspectableStore

__all__ = ["ploints"]
#: The documented API base URL, used by ``register`` unless
#: ``PLOINTS_API_URL`` says otherwise.
DEFAULT_API_URL = "https://ploints.space/api/v1"

ploints = AppGroup("ploints", help="Send, sign and inspect Ploints webhooks.")

name_option = click.option(
    "--name",
    default="ploints",
    show_default=True,
    help="Which PlointsWebhooks instance of the app.",
)


def _app() -> Flask:
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    return app


def _receiver(name: str) -> Receiver:
    try:
        return receiver_for(_app(), name)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


def _post(
    url: str | None, receiver: Receiver, body: bytes, timeout: float = 10.0
) -> tuple[int, str]:
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(body, receiver.settings.secrets[0]),
    }
    if url is None:
        response = current_app.test_client().post(receiver.settings.url, data=body, headers=headers)
        return response.status_code, response.get_data(as_text=True).strip()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode("utf-8", "replace").strip()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise click.ClickException(f"cannot reach {url}: {reason}") from None


def _event_type(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value not in EVENT_TYPES:
        raise click.ClickException(f"unknown event type {value!r}; known: {', '.join(EVENT_TYPES)}")
    return value


def _load_data(data: str | None, data_file: t.IO[str] | None) -> dict[str, t.Any] | None:
    if data is not None and data_file is not None:
        raise click.ClickException("give --data or --data-file, not both")
    text = data if data is not None else (data_file.read() if data_file is not None else None)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise click.ClickException(f"--data is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise click.ClickException("--data must be a JSON object")
    return value


def _event_body(
    event_type: str, data: str | None, data_file: t.IO[str] | None, event_id: str | None
) -> bytes:
    return json.dumps(build_event(event_type, _load_data(data, data_file), id=event_id)).encode()


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
                "--data-file", type=click.File("r"), help="Read the data from a JSON file."
            ),
            click.option("--id", "event_id", help="The event id (default: a fresh one)."),
        ]
    ):
        func = decorator(func)
    return func


@ploints.command("send")
@_event_options
@click.option("--url", help="Post over HTTP to this URL instead of to the app in process.")
@name_option
def send_command(
    event_type: str,
    data: str | None,
    data_file: t.IO[str] | None,
    event_id: str | None,
    url: str | None,
    name: str,
) -> None:
    """Sign a sample event of TYPE with the current secret and deliver it."""
    receiver = _receiver(name)
    body = _event_body(event_type, data, data_file, event_id)
    status, answer = _post(url, receiver, body)
    click.echo(f"{status} {answer}")
    if not 200 <= status < 300:
        sys.exit(1)


@ploints.command("sign")
@click.argument("source", type=click.File("rb"), default="-")
@name_option
def sign_command(source: t.BinaryIO, name: str) -> None:
    """Print the X-Ploints-Signature of a body read from SOURCE (a file, or
    - for standard input) under the current secret.
    """
    click.echo(sign(source.read(), _receiver(name).settings.secrets[0]))


def _describe(func: t.Callable[..., t.Any]) -> str:
    wrapped = getattr(func, "__wrapped__", func)
    module = getattr(wrapped, "__module__", None) or "?"
    return f"{module}.{getattr(wrapped, '__qualname__', repr(wrapped))}"


@ploints.command("events")
@name_option
def events_command(name: str) -> None:
    """List the event types and the handlers connected to each."""
    receiver = _receiver(name)
    app = _app()
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
@name_option
def simulate_command(
    event_type: str,
    data: str | None,
    data_file: t.IO[str] | None,
    event_id: str | None,
    url: str | None,
    speed: float,
    fail_first: int,
    name: str,
) -> None:
    """Deliver one event the way Ploints does: the same body again on the
    retry schedule (+1 min, +5 min, +30 min, +2 h, +12 h, divided by
    --speed) until an answer counts as a 2xx.
    """
    receiver = _receiver(name)
    body = _event_body(event_type, data, data_file, event_id)
    for attempt, delay in enumerate(RETRY_SCHEDULE, start=1):
        time.sleep(delay / speed)
        status, answer = _post(url, receiver, body)
        lost = attempt <= fail_first
        note = " (answer lost: the sender retries)" if lost else ""
        click.echo(f"attempt {attempt} (sender's +{delay} s): {status} {answer}{note}")
        if 200 <= status < 300 and not lost:
            return
    raise click.ClickException("the sender gave up after 6 attempts; the event is marked failed")


def _inspectable(receiver: Receiver) -> InspectableStore:
    store = receiver.store
    if not isinstance(store, InspectableStore):
        raise click.ClickException(
            f"{type(store).__name__} does not keep failed events; use SQLAlchemyStore or RedisStore"
        )
    return store


@ploints.command("failed")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@name_option
def failed_command(limit: int, name: str) -> None:
    """List events that ended failed (after async dispatch gave up)."""
    failed = _inspectable(_receiver(name)).failed(limit)
    if not failed:
        click.echo("no failed events")
    for stored in failed:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stored.updated_at))
        last = (stored.error or "").strip().splitlines()[-1:] or [""]
        click.echo(f"{stored.id}  {when}Z  attempts={stored.attempts}  {last[0]}")


@ploints.command("replay")
@click.argument("event_id", metavar="ID")
@name_option
def replay_command(event_id: str, name: str) -> None:
    """Run a failed event's handlers again from its stored payload."""
    try:
        outcome = replay(_app(), event_id, name=name)
    except (LookupError, ValueError) as error:
        raise click.ClickException(str(error.args[0] if error.args else error)) from None
    except DispatchError:
        raise click.ClickException("the event queue is unavailable; try again later") from None
    except StoreError:
        raise click.ClickException("the dedupe store is unavailable; try again later") from None
    click.echo(f"{event_id}: {outcome}")


@ploints.command("purge")
@name_option
def purge_command(name: str) -> None:
    """Delete processed and failed ids whose retention has passed."""
    store = _receiver(name).store
    purge = getattr(store, "purge", None)
    if purge is None:
        raise click.ClickException(
            f"{type(store).__name__} has nothing to purge (Redis and memory entries expire by themselves)"
        )
    click.echo(f"purged {purge()} expired event(s)")


@ploints.command("register")
@click.option("--url", required=True, help="The public HTTPS URL of your endpoint.")
@click.option(
    "--events",
    "event_types",
    required=True,
    help="Comma-separated event types to subscribe to.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True
)
def register_command(url: str, event_types: str, timeout: float) -> None:
    """Create a webhook at Ploints (POST /api/v1/webhooks) with the API key
    in PLOINTS_API_KEY, and print its id and secret once.
    """
    types = [part.strip() for part in event_types.split(",") if part.strip()]
    unknown = [event_type for event_type in types if event_type not in EVENT_TYPES]
    if not types or unknown:
        raise click.ClickException(
            f"--events: unknown event type(s) {', '.join(unknown) or '(none given)'};"
            f" known: {', '.join(EVENT_TYPES)}"
        )
    api_key = current_app.config.get("PLOINTS_API_KEY") or os.environ.get("PLOINTS_API_KEY")
    if not api_key:
        raise click.ClickException("PLOINTS_API_KEY is not set (config or environment)")
    base = (
        current_app.config.get("PLOINTS_API_URL")
        or os.environ.get("PLOINTS_API_URL")
        or DEFAULT_API_URL
    )
    request = urllib.request.Request(
        f"{base.rstrip('/')}/webhooks",
        data=json.dumps({"url": url, "events": types}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            payload = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        error.close()
        message = "the API key was refused" if error.code in (401, 403) else f"HTTP {error.code}"
        raise click.ClickException(f"Ploints answered {error.code}: {message}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise click.ClickException(f"cannot reach {base}: {reason}") from None
    except ValueError:
        raise click.ClickException("Ploints answered with something that is not JSON") from None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict) or not data.get("secret") or not data.get("id"):
        raise click.ClickException("Ploints answered without a webhook id and secret")
    click.echo(f"webhook {data['id']} created for {data.get('url', url)}")
    click.echo(f"events: {', '.join(data.get('events', types))}")
    click.echo(f"secret: {data['secret']}")
    click.echo(
        "Store the secret now, it is not shown again: set PLOINTS_WEBHOOK_SECRET from your secret"
        " manager or environment, never in source control."
    )
