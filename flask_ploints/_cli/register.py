"""``flask ploints register``: create a webhook through the Ploints API."""

from __future__ import annotations

import http.client
import json
import os
import typing as t
import urllib.error
import urllib.parse
import urllib.request

import click
from flask import current_app

from .._events import EVENT_TYPES
from .._state import delivery_url
from .group import current_flask_app
from .group import name_option
from .group import ploints
from .group import receiver_named
from .http import OPENER
from .http import check_url

__all__ = ["DEFAULT_API_URL", "register_command"]

#: The documented API base URL, used by ``register`` unless
#: ``PLOINTS_API_URL`` says otherwise.
DEFAULT_API_URL = "https://ploints.space/api/v1"


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
@click.option(
    "--account",
    help="Register for this account of an endpoint for many accounts: an <account> in --url is"
    " replaced by it, else --url must end with the endpoint's path for it.",
)
@name_option
def register_command(
    url: str, event_types: str, timeout: float, account: str | None, name: str
) -> None:
    """Create a webhook at Ploints (POST /api/v1/webhooks) with the API key
    in PLOINTS_API_KEY, and print its id and secret once.
    """
    if account is not None:
        url = _account_url(url, account, name)
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
    check_url("PLOINTS_API_URL", base, https_only=True)
    check_url("--url", url)
    request = urllib.request.Request(
        f"{base.rstrip('/')}/webhooks",
        data=json.dumps({"url": url, "events": types}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    try:
        with OPENER.open(request, timeout=timeout) as answer:
            payload = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        error.close()
        if 300 <= error.code < 400:
            message = "a redirect, not followed: the API key goes to PLOINTS_API_URL only"
        elif error.code in (401, 403):
            message = "the API key was refused"
        else:
            message = f"HTTP {error.code}"
        raise click.ClickException(f"Ploints answered {error.code}: {message}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise click.ClickException(f"cannot reach {base}: {reason}") from None
    except (ValueError, RecursionError):
        raise click.ClickException("Ploints answered with something that is not JSON") from None
    webhook = _webhook(payload)
    click.echo(f"webhook {webhook['id']} created for {webhook.get('url', url)}")
    click.echo(f"events: {', '.join(webhook.get('events', types))}")
    click.echo(f"secret: {webhook['secret']}")
    if account is not None:
        click.echo(
            f"Store the secret now, it is not shown again: your PLOINTS_WEBHOOK_SECRET lookup must"
            f" return it for account {account!r} (keep it in your database or secret manager)."
        )
        return
    click.echo(
        "Store the secret now, it is not shown again: set PLOINTS_WEBHOOK_SECRET from your secret"
        " manager or environment, never in source control."
    )


def _account_url(url: str, account: str, name: str) -> str:
    """``--url`` for ``account``: its ``<account>`` replaced, or checked to
    end with the path the endpoint routes for the account.
    """
    try:
        path = delivery_url(current_flask_app(), receiver_named(name), account)
    except ValueError as error:
        raise click.ClickException(f"--account: {error}") from None
    if "<account>" in url:
        return url.replace("<account>", urllib.parse.quote(account, safe=""))
    if not urllib.parse.urlsplit(url).path.endswith(path):
        raise click.ClickException(
            f"--url {url!r} is not the endpoint's URL for account {account!r}: its path must end"
            f" with {path!r} (or put <account> in --url)"
        )
    return url


def _webhook(payload: object) -> dict[str, t.Any]:
    """The ``data`` of the API's answer, with each field of the documented
    shape; anything else is a one-line error.
    """
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        raise click.ClickException("Ploints answered without a webhook id and secret")
    fields = {"id": data.get("id"), "secret": data.get("secret")}
    if not all(
        isinstance(value, str) and value.isprintable() and value for value in fields.values()
    ):
        raise click.ClickException("Ploints answered without a webhook id and secret")
    url = data.get("url")
    events = data.get("events")
    if url is not None and not (isinstance(url, str) and url.isprintable()):
        raise click.ClickException("Ploints answered with a webhook url that is not a string")
    if events is not None and not (
        isinstance(events, list)
        and all(isinstance(event, str) and event.isprintable() for event in events)
    ):
        raise click.ClickException("Ploints answered with webhook events that are not strings")
    return {
        key: value
        for key, value in {**fields, "url": url, "events": events}.items()
        if value is not None
    }
