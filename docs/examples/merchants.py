"""One endpoint for every merchant's Ploints account."""

from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

# Stands for your merchants table: each account's secrets, the current first.
SECRETS: dict[str, list[str]] = {
    "acme": ["whsec_acme_1"],
    "globex": ["whsec_globex_1"],
}


def merchant_secrets(account: str) -> list[str] | None:
    """The secrets of ``account``, or None for an account we do not serve."""
    return SECRETS.get(account)


app = Flask(__name__)
app.config["PLOINTS_WEBHOOK_URL"] = "/webhooks/ploints/<account>"
app.config["PLOINTS_WEBHOOK_SECRET"] = merchant_secrets
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
