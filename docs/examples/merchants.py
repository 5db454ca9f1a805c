"""One endpoint for every merchant's Ploints account."""

from flask import Flask

from flask_ploints import Account
from flask_ploints import Event
from flask_ploints import PlointsWebhooks

# Stands for your merchants table: each account's secrets, the current first.
SECRETS: dict[str, list[str]] = {
    "acme": ["whsec_acme_1"],
    "globex": ["whsec_globex_1"],
}


def merchant_account(account: str) -> Account | None:
    """The merchant the URL names, or None for one we do not serve.

    Like a case-insensitive database lookup, ``/ACME`` finds acme too: the
    Account names it by its one slug, so that each event runs once however
    the URL spells it.
    """
    slug = account.strip().casefold()
    secrets = SECRETS.get(slug)
    return None if secrets is None else Account(slug, secrets)


app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_URL"] = "/webhooks/ploints/<account>"
app.config["PLOINTS_WEBHOOK_SECRET"] = merchant_account
webhooks = PlointsWebhooks(app)
balances: dict[tuple[str | None, str], int] = {}


@webhooks.on("points.earned")
def points_earned(event: Event) -> None:
    # The same customer at two merchants is two balances.
    balances[(event.account, event.data["customerEmail"])] = event.data["newBalance"]


def start_rotation(account: str, new_secret: str) -> None:
    """Accept the new secret next to the old one, until Ploints signs with it."""
    SECRETS[account] = [new_secret, SECRETS[account][0]]


def finish_rotation(account: str) -> None:
    """Ploints signs with the new secret now: the old one is refused."""
    SECRETS[account] = SECRETS[account][:1]
