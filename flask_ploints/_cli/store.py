"""The commands on what the dedupe store keeps: ``failed``, ``replay`` and
``purge``.
"""

from __future__ import annotations

import contextlib
import sys
import time
import typing as t

import click

from .._errors import DispatchError
from .._errors import StoreError
from .._state import Receiver
from ..replay import ReplayOutcome
from ..replay import replay
from ..stores import InspectableStore
from .group import current_flask_app
from .group import logged
from .group import name_option
from .group import ploints
from .group import receiver_named
from .group import summary

__all__ = ["failed_command", "purge_command", "replay_command"]


@contextlib.contextmanager
def _store_down() -> t.Iterator[None]:
    """A store error in the block ends the command with a one-line error."""
    try:
        yield
    except StoreError:
        raise click.ClickException("the dedupe store is unavailable; try again later") from None


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
    receiver = receiver_named(name)
    with _store_down():
        failed = _inspectable(receiver).failed(limit)
    # A store shared by several instances lists theirs too.
    mine = [(receiver.processor.namespace.split(stored.id), stored) for stored in failed]
    if not any(found is not None for found, _ in mine):
        click.echo("no failed events")
    for found, stored in mine:
        if found is None:
            continue
        account, event_id = found
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stored.updated_at))
        last = (stored.error or "").strip().splitlines()[-1:] or [""]
        of = "" if account is None else f"  account={account}"
        click.echo(f"{event_id}  {when}Z  attempts={stored.attempts}{of}  {last[0]}")


@ploints.command("replay")
@click.argument("event_id", metavar="ID")
@click.option("--account", help="The event's account, on an endpoint for many accounts.")
@name_option
def replay_command(event_id: str, account: str | None, name: str) -> None:
    """Run a failed event's handlers again from its stored payload."""
    try:
        with _store_down(), logged() as records:
            outcome = replay(current_flask_app(), event_id, name=name, account=account)
    except (LookupError, ValueError) as error:
        raise click.ClickException(str(error.args[0] if error.args else error)) from None
    except DispatchError:
        raise click.ClickException("the event queue is unavailable; try again later") from None
    click.echo(f"{event_id}: {outcome}{summary(records)}")
    if outcome is ReplayOutcome.FAILED:
        # A script must tell a replay that failed again from one that worked.
        sys.exit(1)


@ploints.command("purge")
@name_option
def purge_command(name: str) -> None:
    """Delete processed and failed ids whose retention has passed."""
    store = receiver_named(name).store
    purge = getattr(store, "purge", None)
    if purge is None:
        raise click.ClickException(
            f"{type(store).__name__} has nothing to purge: its entries expire by themselves,"
            " or it keeps none"
        )
    with _store_down():
        count = purge()
    click.echo(f"purged {count} expired event(s)")
