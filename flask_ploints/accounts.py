"""One endpoint for many Ploints accounts: the account in the URL, and its
secrets from the app's lookup.

``PLOINTS_WEBHOOK_URL = "/webhooks/ploints/<account>"`` with
``PLOINTS_WEBHOOK_SECRET = lookup``, where ``lookup(account)`` returns that
account's secret, a list of them while it is rotated, or ``None`` for an
account the app does not know. See :doc:`/accounts`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import typing as t

from .errors import ConfigError
from .errors import SecretLookupError

__all__ = ["MAX_ACCOUNT_LENGTH", "Accounts", "SecretLookup", "names_account"]

#: The longest account name an endpoint accepts; longer ones are unknown.
MAX_ACCOUNT_LENGTH = 128

#: What ``PLOINTS_WEBHOOK_SECRET`` is for an endpoint of many accounts.
SecretLookup = t.Callable[[str], "str | t.Sequence[str] | None"]

# A werkzeug rule variable named "account", with or without a converter.
_ACCOUNT_VARIABLE = re.compile(r"<(?:[A-Za-z_][A-Za-z0-9_]*(?:\([^)]*\))?:)?account>")


def names_account(url: str) -> bool:
    """Whether the URL rule ``url`` has an ``<account>`` variable."""
    return _ACCOUNT_VARIABLE.search(url) is not None


def check_lookup(url: str, secret: object) -> SecretLookup | None:
    """Return ``secret`` when it is a lookup, checked against ``url``: a
    lookup needs an ``<account>`` in the URL, and an ``<account>`` a lookup.

    :raises ConfigError: naming the key that is wrong.
    """
    lookup = secret if callable(secret) else None
    if lookup is not None and not names_account(url):
        raise ConfigError(
            "PLOINTS_WEBHOOK_SECRET is a lookup function, so PLOINTS_WEBHOOK_URL must have an"
            f" <account> variable (such as '/webhooks/ploints/<account>'), not {url!r}"
        )
    if lookup is None and names_account(url):
        raise ConfigError(
            f"PLOINTS_WEBHOOK_URL {url!r} has an <account> variable, so PLOINTS_WEBHOOK_SECRET"
            " must be a function that returns an account's secret (or None for an unknown one)"
        )
    return t.cast("SecretLookup | None", lookup)


# The account and secrets of the delivery being processed, so that its
# Celery proof is signed without calling the lookup a second time.
_verified: contextvars.ContextVar[tuple[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "ploints_verified_account", default=None
)


#: How many single secrets an endpoint keeps checked and encoded; past it,
#: it starts again with none.
_CHECKED_SECRETS = 4096


def _as_keys(account: str, found: object) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    # What the lookup returned for account, as secrets and the bytes they
    # sign with, or the error that says why it is not a secret or a list.
    secrets = (found,) if isinstance(found, str) else found
    if (
        not isinstance(secrets, (list, tuple))
        or not secrets
        or not all(isinstance(secret, str) and secret.strip() for secret in secrets)
    ):
        raise SecretLookupError(
            f"the secret lookup returned a {type(found).__name__} for account {account!r}:"
            " it must return a secret, a list of secrets or None"
        )
    try:
        return tuple(secrets), tuple(secret.encode("utf-8") for secret in secrets)
    except UnicodeEncodeError:
        raise SecretLookupError(
            f"the secret lookup returned a secret for account {account!r} that is not valid"
            " UTF-8 (a lone surrogate)"
        ) from None


class Accounts:
    """The secrets of the accounts of one endpoint, from ``lookup``, which
    is called once per delivery; see :doc:`/accounts` for caching it.

    :param lookup: ``lookup(account)`` returns the account's secret, a
        sequence of them (the current first, while a secret is rotated), or
        ``None`` for an account the app does not know.
    """

    def __init__(self, lookup: SecretLookup) -> None:
        self.lookup = lookup
        self._checked: dict[str, tuple[tuple[str, ...], tuple[bytes, ...]]] = {}

    def secrets(self, account: str) -> tuple[str, ...] | None:
        """Return ``account``'s secrets, the current one first, or ``None``
        for an unknown account, or a name no account can have (too long, or
        holding a control character).

        :raises SecretLookupError: the lookup raised, or returned something
            that is not a secret, a list of them or ``None``.
        """
        found = self.keys(account)
        return None if found is None else found[0]

    def keys(self, account: str) -> tuple[tuple[str, ...], tuple[bytes, ...]] | None:
        """:meth:`secrets`, and the same as the bytes they sign with."""
        if len(account) > MAX_ACCOUNT_LENGTH or not account.isprintable():
            return None
        try:
            found = self.lookup(account)
        except Exception as exc:
            raise SecretLookupError(
                f"the secret lookup raised {type(exc).__name__} for account {account!r}"
            ) from exc
        if type(found) is not str:
            return None if found is None else _as_keys(account, found)
        # The common answer, one secret: checked and encoded once, then
        # found by its value, so a rotated secret is a new entry, never a
        # stale one.
        keys = self._checked.get(found)
        if keys is None:
            if len(self._checked) >= _CHECKED_SECRETS:
                self._checked.clear()
            keys = self._checked[found] = _as_keys(account, found)
        return keys

    @contextlib.contextmanager
    def verified(self, account: str, secrets: tuple[str, ...]) -> t.Iterator[None]:
        """Remember ``account``'s ``secrets``, which verified the delivery
        being processed, for :meth:`current_secret` within the block.
        """
        token = _verified.set((account, secrets))
        try:
            yield
        finally:
            _verified.reset(token)

    def current_secret(self, account: str) -> str:
        """Return ``account``'s current secret: the one of the delivery
        being processed, else from the lookup (a replay).

        :raises SecretLookupError: the lookup failed, or does not know the
            account.
        """
        verified = _verified.get()
        if verified is not None and verified[0] == account:
            return verified[1][0]
        secrets = self.secrets(account)
        if secrets is None:
            raise SecretLookupError(f"the secret lookup does not know account {account!r}")
        return secrets[0]
