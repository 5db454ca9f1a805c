"""One endpoint for many Ploints accounts: the account in the URL, and its
secrets from the app's lookup.

``PLOINTS_WEBHOOK_URL = "/webhooks/ploints/<account>"`` with
``PLOINTS_WEBHOOK_SECRET = lookup``, where ``lookup(account)`` gets the
URL's value (converted by the rule's converter) and returns an
:class:`Account`, or ``None`` for an account the app does not know (a bare
secret or list of them is accepted too). See :doc:`/accounts`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import re
import typing as t
from dataclasses import dataclass

from ._errors import ConfigError
from ._errors import SecretLookupError

if t.TYPE_CHECKING:
    from flask import Flask

__all__ = ["MAX_ACCOUNT_LENGTH", "Account", "Accounts", "SecretLookup", "names_account"]

#: The longest account name an endpoint accepts; longer ones are unknown.
MAX_ACCOUNT_LENGTH = 128

#: How many calls of one endpoint's lookup may run at once in a process;
#: a delivery past them is answered ``503`` at once rather than queued.
LOOKUPS_IN_FLIGHT = 16


@dataclass(frozen=True)
class Account:
    """An account that the secret lookup found: its canonical name and
    its secrets. The name, not the URL's spelling of it, keys the dedupe
    store and is :attr:`Event.account <flask_ploints.Event.account>`, in
    logs, metrics, traces and the delivery log, so that one account reached
    under several spellings (``/acme``, ``/ACME``) runs each event once.

    .. versionadded:: 0.2

    :param name: the account's one name: non-empty, printable, at most
        :data:`MAX_ACCOUNT_LENGTH` characters.
    :param secret: its secret, or a list of them while one is rotated, the
        current one first.
    """

    name: str
    secret: str | t.Sequence[str]


#: What ``PLOINTS_WEBHOOK_SECRET`` is for an endpoint of many accounts: it
#: gets the URL's ``<account>`` value, as its converter made it.
SecretLookup = t.Callable[[t.Any], "Account | str | t.Sequence[str] | None"]

# A werkzeug rule variable named "account", with or without a converter.
_ACCOUNT_VARIABLE = re.compile(r"<(?:[A-Za-z_][A-Za-z0-9_]*(?:\([^)]*\))?:)?account>")


class LookupBusy(SecretLookupError):
    """Every lookup slot of the endpoint is taken: the delivery is answered
    ``503`` at once rather than waiting for one.
    """


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


# The account, secrets and URL path of the delivery being processed, so
# that its Celery task is signed without calling the lookup a second time
# and carries the path the worker finds the lookup's argument in again.
_verified: contextvars.ContextVar[tuple[str, tuple[str, ...], str | None] | None] = (
    contextvars.ContextVar("ploints_verified_account", default=None)
)


#: How many single secrets an endpoint keeps checked and encoded; past it,
#: it starts again with none.
_CHECKED_SECRETS = 4096

#: What a lookup's answer is to the endpoint: the account's name, its
#: secrets, and the bytes they sign with.
Found = tuple[str, tuple[str, ...], tuple[bytes, ...]]


def _is_name(name: str) -> bool:
    return 0 < len(name) <= MAX_ACCOUNT_LENGTH and name.isprintable()


def account_name(value: object) -> str:
    """The name of the URL's ``<account>`` value: its string form."""
    return value if type(value) is str else str(value)


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
            " it must return an Account, a secret, a list of secrets or None"
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

    :param lookup: ``lookup(value)`` gets the URL's ``<account>`` value and
        returns an :class:`Account`, or the account's secret or a sequence of
        them (the current first) under the value's string form as its name,
        or ``None`` for an account the app does not know.
    :param in_flight: how many calls of ``lookup`` may run at once
        (:data:`LOOKUPS_IN_FLIGHT` by default); past them, :meth:`find`
        raises :class:`LookupBusy` without calling it.
    """

    def __init__(self, lookup: SecretLookup, in_flight: int | None = None) -> None:
        self.lookup = lookup
        self._checked: dict[str, tuple[tuple[str, ...], tuple[bytes, ...]]] = {}
        # One token per slot: a SimpleQueue takes and gives back in C, where
        # a Semaphore runs a Condition in Python.
        self._slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(LOOKUPS_IN_FLIGHT if in_flight is None else in_flight):
            self._slots.put(None)

    def find(self, value: object) -> Found | None:
        """Return the account the URL's ``value`` names: its name, secrets
        and keys; ``None`` for an unknown account, or a value whose string
        form no account can have (empty, too long, or holding a control
        character), for which the lookup is not called.

        :raises LookupBusy: every lookup slot is taken.
        :raises SecretLookupError: the lookup raised, or returned something
            that is not an :class:`Account`, a secret, a list of them or
            ``None``, or an :class:`Account` with a bad name.
        """
        name = value if type(value) is str else str(value)
        if not 0 < len(name) <= MAX_ACCOUNT_LENGTH or not name.isprintable():
            return None
        try:
            self._slots.get_nowait()
        except queue.Empty:
            raise LookupBusy(
                f"every secret lookup slot is taken; refused account {name!r}"
            ) from None
        try:
            found = self.lookup(value)
        except Exception as exc:
            raise SecretLookupError(
                f"the secret lookup raised {type(exc).__name__} for account {name!r}"
            ) from exc
        finally:
            self._slots.put(None)
        if found is None:
            return None
        if isinstance(found, Account):
            name = found.name
            if not isinstance(name, str) or not _is_name(name):
                raise SecretLookupError(
                    f"the secret lookup returned an Account named {name!r} for account"
                    f" {account_name(value)!r}: its name must be a printable string of 1 to"
                    f" {MAX_ACCOUNT_LENGTH} characters"
                )
            found = found.secret
        if type(found) is not str:
            return (name, *_as_keys(name, found))
        # The common answer, one secret: checked and encoded once, then
        # found by its value, so a rotated secret is a new entry, never a
        # stale one.
        keys = self._checked.get(found)
        if keys is None:
            if len(self._checked) >= _CHECKED_SECRETS:
                self._checked.clear()
            keys = self._checked[found] = _as_keys(name, found)
        return (name, *keys)

    def secrets(self, account: object) -> tuple[str, ...] | None:
        """Return the secrets of the account ``account`` names, the current
        one first, or ``None`` for an unknown one (see :meth:`find`).

        :raises SecretLookupError: as :meth:`find`.
        """
        found = self.find(account)
        return None if found is None else found[1]

    @contextlib.contextmanager
    def verified(
        self, account: str, secrets: tuple[str, ...], path: str | None = None
    ) -> t.Iterator[None]:
        """Remember ``account``'s ``secrets``, which verified the delivery
        being processed, and the URL ``path`` it came to, for
        :meth:`current` within the block.
        """
        token = _verified.set((account, secrets, path))
        try:
            yield
        finally:
            _verified.reset(token)

    def current(self, account: str) -> tuple[str, str | None]:
        """Return ``account``'s current secret and the URL path of its
        delivery: those of the delivery being processed, else the secret
        from the lookup called with the name, and no path (a replay).

        :raises SecretLookupError: the lookup failed, or does not know the
            account.
        """
        verified = _verified.get()
        if verified is not None and verified[0] == account:
            return verified[1][0], verified[2]
        secrets = self.secrets(account)
        if secrets is None:
            raise SecretLookupError(f"the secret lookup does not know account {account!r}")
        return secrets[0], None

    def current_secret(self, account: str) -> str:
        """Return ``account``'s current secret (see :meth:`current`).

        :raises SecretLookupError: as :meth:`current`.
        """
        return self.current(account)[0]

    def for_task(self, app: Flask, endpoint: str, account: str, path: str | None) -> Found | None:
        """Return the account of a task of ``account`` published from a
        delivery to the URL ``path``: the lookup is called with the value
        :func:`url_value` finds in ``path`` (``account`` itself when there
        is no path, a replay), and must name ``account`` again, else the
        task's account is unknown.

        :raises SecretLookupError: as :meth:`find`.
        """
        value = account if path is None else url_value(app, endpoint, path, account)
        found = self.find(value)
        return found if found is not None and found[0] == account else None


def url_value(app: Flask, endpoint: str, path: str, default: object) -> object:
    """Return the ``<account>`` value that ``app``'s URL map converts the
    decoded URL ``path`` to for ``endpoint``, as a delivery to it gets, or
    ``default`` when the path routes elsewhere.
    """
    try:
        matched, arguments = app.url_map.bind("localhost").match(path, method="POST")
    except Exception:
        return default
    return arguments.get("account", default) if matched == endpoint else default
