"""The app of an endpoint for many accounts that ``tests/test_accounts.py``
runs under a real Celery worker, and builds in the test process too.

A worker loads it with ``celery -A tests.accounts_app:celery worker``, from
the same ``PLOINTS_CELERY_TEST_*`` variables as :mod:`tests.celery_app`.
The accounts' secrets live in Redis (a hash of JSON values, a secret or a
list of them), so that a test changes them for both processes at once. An
account set with :meth:`Ledger.set_account` is found under each of its
spellings only, never its canonical name, and named by an
:class:`~flask_ploints.Account`; the others by bare secrets. Each
call of the lookup is counted there by process role (``web`` or
``worker``) and account. The handler records, by ``account/id``, each run
and the account it saw, and fails while the event's data holds
``"fail": true`` and the namespace's ``fixed`` key is missing.
"""

from __future__ import annotations

import json
import os
import typing as t

import redis
from flask import Flask

from flask_ploints import Account
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import signals

from .celery_flask import celery_init_app
from .celery_flask import celery_settings

URL = "/webhooks/ploints/<account>"


class Ledger:
    """The accounts' secrets and what the handlers did, in Redis under
    ``namespace``.
    """

    def __init__(self, url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.namespace = namespace

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def set_secrets(self, account: str, secrets: str | list[str]) -> None:
        self.client.hset(self.key("secrets"), account, json.dumps(secrets))

    def set_account(self, name: str, secrets: str | list[str], spellings: list[str]) -> None:
        self.client.hset(self.key("accounts"), name, json.dumps(secrets))
        for spelling in spellings:
            self.client.hset(self.key("spellings"), spelling, name)

    def account(self, spelling: str) -> Account | None:
        name = self.client.hget(self.key("spellings"), spelling)
        if name is None:
            return None
        secrets = json.loads(self.client.hget(self.key("accounts"), name) or "null")
        return Account(name.decode(), secrets)

    def secrets(self, account: str) -> str | list[str] | None:
        found = self.client.hget(self.key("secrets"), account)
        return None if found is None else t.cast("str | list[str]", json.loads(found))

    def add(self, name: str, field: str) -> None:
        self.client.hincrby(self.key(name), field, 1)

    def count(self, name: str) -> dict[str, int]:
        found = self.client.hgetall(self.key(name))
        return {key.decode(): int(value) for key, value in found.items()}

    def fix(self) -> None:
        self.client.set(self.key("fixed"), 1)

    def forget(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.namespace}:*", count=500))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        self.client.close()


def create_app(
    broker_url: str,
    redis_url: str,
    namespace: str,
    role: str,
    config: t.Mapping[str, t.Any] | None = None,
) -> Flask:
    """Build the app of one test, for the process ``role`` (``web`` or
    ``worker``).
    """
    ledger = Ledger(redis_url, namespace)

    def lookup(account: str) -> Account | str | list[str] | None:
        ledger.add("lookups", f"{role}:{account}")
        return ledger.account(account) or ledger.secrets(account)

    app = Flask("ploints_accounts_test")
    app.testing = True
    app.config.update(
        PLOINTS_WEBHOOK_URL=URL,
        PLOINTS_WEBHOOK_SECRET=lookup,
        PLOINTS_DISPATCH="celery",
        PLOINTS_DEDUPE_STORE=redis_url,
        PLOINTS_REDIS_PREFIX=f"{namespace}:store:",
        PLOINTS_CELERY_QUEUE=namespace,
        CELERY=celery_settings(broker_url),
    )
    app.config.update(config or {})

    celery_init_app(app)
    webhooks = PlointsWebhooks(app)

    @webhooks.on_any
    def handle(event: Event) -> None:
        field = f"{event.account}/{event.id}"
        ledger.add("starts", field)
        if event.data.get("fail") and not ledger.client.exists(ledger.key("fixed")):
            raise RuntimeError(f"handler broke on purpose on {field}")
        ledger.add("effects", f"{role}:{field}")

    def processed(sender: Flask, *, event: Event, **extra: t.Any) -> None:
        ledger.add("event_processed", f"{event.account}/{event.id}")

    def failed(sender: Flask, *, event: Event, **extra: t.Any) -> None:
        ledger.add("handler_failed", f"{event.account}/{event.id}")

    signals.event_processed.connect(processed, sender=app, weak=False)
    signals.handler_failed.connect(failed, sender=app, weak=False)
    return app


if "PLOINTS_CELERY_TEST_NAMESPACE" in os.environ:
    flask_app = create_app(
        os.environ["PLOINTS_CELERY_TEST_BROKER"],
        os.environ["PLOINTS_CELERY_TEST_REDIS"],
        os.environ["PLOINTS_CELERY_TEST_NAMESPACE"],
        "worker",
        json.loads(os.environ.get("PLOINTS_CELERY_TEST_CONFIG", "{}")),
    )
    celery = flask_app.extensions["celery"]
