"""The configurations of the guarantee matrix, :mod:`tests.test_matrix`:
every supported dedupe store, account mode and dispatch mode, and the app
each cell of their product runs, in the test process (the endpoint) and,
with Celery dispatch, in a real worker (``celery -A
tests.matrix_support:celery worker``, which builds its cell's app from the
``PLOINTS_CELERY_TEST_*`` variables that :class:`tests.celery_support.Workers`
sets).

A new store, database or URL form gets every promise by one more entry in
:data:`STORES`; a new URL converter or lookup by one in :data:`ACCOUNTS`.
``docs/guarantees.rst`` lists the same cells ("The guarantee matrix"), and
``tests/test_docs.py`` checks that the two agree.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import socket
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass
from dataclasses import field

from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

from .support import MARIADB_URL
from .support import POSTGRES_URL
from .support import REDIS_URL

#: What each promise is called, in the docs' table and in the test names.
PROMISES = ("distinct", "repeat", "retry", "bad body", "silence", "visible", "order")

#: The services a store may need: (name, host, port), as ``require_service``
#: takes them.
REDIS = ("Redis", "127.0.0.1", 6379)
POSTGRESQL = ("PostgreSQL", "127.0.0.1", 5432)
MARIADB = ("MariaDB", "127.0.0.1", 3306)

#: The SQL stores' statement timeout in these tests: the silent-backend
#: bound, shorter than the default 2 s to keep the matrix fast.
SQL_TIMEOUT = 1.0


@dataclass(frozen=True)
class Store:
    """One way to configure the dedupe store.

    :param name: the cell's name for it.
    :param kind: ``memory``, ``redis``, ``url`` (a database URL) or ``db``
        (the app's Flask-SQLAlchemy extension, on that database).
    :param database: ``sqlite``, ``postgresql`` or ``mariadb`` for ``url``
        and ``db``.
    :param service: what it needs running, or ``None``.
    :param silence: how the backend is made silent: ``proxy`` (a TCP proxy
        on loopback in front of the server stops passing bytes), ``lock``
        (another connection holds SQLite's write lock), or ``None``.
    """

    name: str
    kind: t.Literal["memory", "redis", "url", "db"]
    database: str | None = None
    service: tuple[str, str, int] | None = None
    silence: t.Literal["proxy", "lock"] | None = None

    @property
    def server_url(self) -> str | None:
        """The URL of the server it talks to (``None``: SQLite, memory)."""
        if self.kind == "redis":
            return REDIS_URL
        return {"postgresql": POSTGRES_URL, "mariadb": MARIADB_URL}.get(self.database or "")


#: Every supported store configuration.
STORES = [
    Store("memory", "memory"),
    Store("redis", "redis", service=REDIS, silence="proxy"),
    Store("sqlite-url", "url", "sqlite", silence="lock"),
    Store("postgresql-url", "url", "postgresql", POSTGRESQL, silence="proxy"),
    Store("mariadb-url", "url", "mariadb", MARIADB, silence="proxy"),
    Store("db-sqlite", "db", "sqlite", silence="lock"),
    Store("db-postgresql", "db", "postgresql", POSTGRESQL, silence="proxy"),
    Store("db-mariadb", "db", "mariadb", MARIADB, silence="proxy"),
]


@dataclass(frozen=True)
class Target:
    """One account of an account mode: the URL segment a delivery is posted
    to, the name handlers see as ``event.account``, and its secret.
    """

    segment: str | None
    account: str | None
    secret: str


@dataclass(frozen=True)
class AccountMode:
    """One or many accounts on the endpoint.

    :param name: the cell's name for it.
    :param rule: ``PLOINTS_WEBHOOK_URL``, or ``None`` for the default.
    :param targets: the accounts posted to; the first one's :attr:`aliases`
        are the same account spelt otherwise in the URL.
    :param aliases: URL segments that are the first target's account.
    :param unknown: a URL segment no account has.
    :param secret: builds ``PLOINTS_WEBHOOK_SECRET``.
    """

    name: str
    rule: str | None
    targets: tuple[Target, ...]
    aliases: tuple[str, ...]
    unknown: str | None
    secret: t.Callable[[], object] = field(compare=False)

    def url(self, segment: str | None) -> str:
        """The path a delivery for ``segment`` is posted to."""
        return "/webhooks/ploints" if segment is None else f"/webhooks/ploints/{segment}"

    def same_account(self) -> list[Target]:
        """The first target, and each of its aliases, as targets."""
        first = self.targets[0]
        return [first, *(Target(alias, first.account, first.secret) for alias in self.aliases)]


_UUIDS = (uuid.UUID("8f0c7a52-3d4e-4b9a-9f1e-0c2d3b4a5e6f"), uuid.UUID(int=42))
_PLAIN = {"acme": "whsec_acme", "globex": "whsec_globex"}
_INTS = {7: "whsec_seven", 42: "whsec_forty_two"}
_BY_UUID = {_UUIDS[0]: "whsec_uuid_a", _UUIDS[1]: "whsec_uuid_b"}


def _plain(value: object) -> str | None:
    return _PLAIN.get(value) if isinstance(value, str) else None


def _by_int(value: object) -> str | None:
    # The converted value, as the spec has it: a str "7" is not account 7.
    return _INTS.get(value) if type(value) is int else None


def _by_uuid(value: object) -> str | None:
    return _BY_UUID.get(value) if isinstance(value, uuid.UUID) else None


def _case_insensitive() -> t.Callable[[object], object]:
    # Imported here: Account is a name other work adds; until then only
    # this mode's cells fail.
    from flask_ploints import Account  # type: ignore[attr-defined,unused-ignore]

    def lookup(value: object) -> object:
        if not isinstance(value, str):
            return None
        name = value.casefold()
        secret = _PLAIN.get(name)
        return None if secret is None else Account(name, secret)

    return lookup


#: Every supported account mode.
ACCOUNTS = [
    AccountMode(
        "one", None, (Target(None, None, "whsec_matrix"),), (), None, lambda: "whsec_matrix"
    ),
    AccountMode(
        "plain",
        "/webhooks/ploints/<account>",
        tuple(Target(name, name, secret) for name, secret in _PLAIN.items()),
        (),
        "initech",
        lambda: _plain,
    ),
    AccountMode(
        "int",
        "/webhooks/ploints/<int:account>",
        tuple(Target(str(number), str(number), secret) for number, secret in _INTS.items()),
        (),
        "99",
        lambda: _by_int,
    ),
    AccountMode(
        "uuid",
        "/webhooks/ploints/<uuid:account>",
        tuple(Target(str(key), str(key), secret) for key, secret in _BY_UUID.items()),
        # werkzeug's uuid converter takes upper case too: the same account.
        (str(_UUIDS[0]).upper(),),
        str(uuid.UUID(int=7)),
        lambda: _by_uuid,
    ),
    AccountMode(
        "case-insensitive",
        "/webhooks/ploints/<account>",
        (Target("Acme", "acme", _PLAIN["acme"]), Target("GLOBEX", "globex", _PLAIN["globex"])),
        ("acme", "ACME"),
        "initech",
        _case_insensitive,
    ),
]

#: Every dispatch mode.
DISPATCH = ("sync", "celery")

#: The (store, account mode) cells that run with Celery dispatch, each on a
#: real worker of its own (some 3 s each of the suite's budget).
CELERY_CELLS = {("redis", "one"), ("redis", "int"), ("db-postgresql", "one")}


@dataclass(frozen=True, repr=False)
class Cell:
    """One configuration: a store, an account mode, a dispatch mode."""

    store: Store
    accounts: AccountMode
    dispatch: str

    def __repr__(self) -> str:
        return f"<Cell {self.id}>"

    @property
    def id(self) -> str:
        return f"{self.store.name}/{self.accounts.name}/{self.dispatch}"


def exclusion(cell: Cell, promise: str) -> str | None:
    """Why ``promise`` is not run on ``cell``, or ``None`` when it is."""
    if cell.dispatch == "celery":
        if cell.store.kind == "memory":
            return "a memory store is per process: a worker never sees the endpoint's claim"
        if (cell.store.name, cell.accounts.name) not in CELERY_CELLS:
            return (
                "a worker per cell: Celery runs on Redis (one account, <int:account>) and on db"
                " on PostgreSQL; plain <account> on Celery:"
                " tests/test_accounts.py::test_two_accounts_on_a_celery_worker; the SQL store by"
                " URL on Celery: tests/test_celery_redis.py::test_worker_killed"
            )
        if promise == "silence":
            return (
                "the endpoint claims before it queues, the same call as sync dispatch; a"
                " silent broker: tests/test_celery.py::test_broker_never_answers"
            )
    if promise == "visible":
        if cell.store.kind not in ("url", "db"):
            return "no SQL database: nothing for an engine's events to see"
        if cell.dispatch == "celery":
            return "the endpoint claims before it queues, through the same store call as sync"
        if cell.accounts.name != "one":
            return "the account changes the store's key, not the statements' path"
    if promise == "silence":
        if cell.store.silence is None:
            return "the memory store has no backend to fall silent"
        if cell.accounts.name != "one":
            return "the account changes the store's key, not its connection or its deadline"
    return None


#: Every cell of the product, in order.
EVERY_CELL = [Cell(*parts) for parts in itertools.product(STORES, ACCOUNTS, DISPATCH)]


def cells(promise: str) -> list[Cell]:
    """The cells ``promise`` runs on."""
    return [cell for cell in EVERY_CELL if exclusion(cell, promise) is None]


class Journal:
    """Every handler run of one cell's app, in order: (account, id,
    outcome), ``outcome`` being ``"ok"`` or ``"failed"``; in this process,
    or in the Redis list ``key`` when a worker runs the handlers.
    """

    def __init__(self, redis_url: str | None = None, key: str | None = None) -> None:
        self._runs: list[tuple[str | None, str, str]] = []
        self._tried: set[tuple[str | None, str]] = set()
        self._key = key
        self._client: t.Any = None
        if redis_url is not None:
            import redis

            self._client = redis.Redis.from_url(redis_url, socket_timeout=5)

    def record(self, account: str | None, event_id: str, outcome: str) -> None:
        if self._client is None:
            self._runs.append((account, event_id, outcome))
        else:
            self._client.rpush(self._key, json.dumps([account, event_id, outcome]))

    def first_attempt(self, account: str | None, event_id: str) -> bool:
        """Whether this is the first run of the event (its first attempt)."""
        if self._client is None:
            first = (account, event_id) not in self._tried
            self._tried.add((account, event_id))
            return first
        marker = f"{self._key}:tried:{account}:{event_id}".encode()
        return bool(self._client.set(marker, 1, nx=True, ex=600))

    def runs(self) -> list[tuple[str | None, str, str]]:
        if self._client is None:
            return list(self._runs)
        items = self._client.lrange(self._key, 0, -1)
        return [
            (account, event_id, outcome) for account, event_id, outcome in map(json.loads, items)
        ]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@dataclass
class Backend:
    """Where one store keeps its events in this module's run: its URL (a
    SQLite file of the module's own; a proxy's port for a silent one), its
    table or key prefix.
    """

    store: Store
    url: str | None
    name: str

    def config(self, url: str | None = None) -> dict[str, t.Any]:
        """The app's store config keys (``db`` not yet made), on ``url``
        (default: :attr:`url`).
        """
        url = url or self.url
        kind = self.store.kind
        if kind == "memory":
            return {"PLOINTS_DEDUPE_STORE": "memory"}
        if kind == "redis":
            return {"PLOINTS_DEDUPE_STORE": url, "PLOINTS_REDIS_PREFIX": f"{self.name}:"}
        sql = {"PLOINTS_SQL_TABLE": self.name, "PLOINTS_SQL_TIMEOUT": SQL_TIMEOUT}
        if kind == "url":
            return {"PLOINTS_DEDUPE_STORE": url, **sql}
        return {"SQLALCHEMY_DATABASE_URI": url, "PLOINTS_DEDUPE_STORE": "db", **sql}


def create_app(
    cell: Cell,
    backend: Backend,
    journal: Journal,
    url: str | None = None,
    celery: dict[str, t.Any] | None = None,
) -> Flask:
    """A fresh app of ``cell`` on ``backend`` (at ``url``, a proxy, if
    given), whose handler of every event records each run in ``journal``
    and fails the first attempt at an event whose data holds ``"fail":
    true``; a handler of ``customer.tier_changed`` with ``latest_by`` its
    customer records its runs as ``"tier"``.

    :param celery: with Celery dispatch: ``broker`` and ``queue``.
    """
    app = Flask("ploints_matrix")
    app.testing = True
    config = backend.config(url)
    if cell.accounts.rule is not None:
        config["PLOINTS_WEBHOOK_URL"] = cell.accounts.rule
    config["PLOINTS_WEBHOOK_SECRET"] = cell.accounts.secret()
    if config["PLOINTS_DEDUPE_STORE"] == "db":
        from flask_sqlalchemy import SQLAlchemy

        db = SQLAlchemy()
        config["PLOINTS_DEDUPE_STORE"] = db
        app.config.update(config)
        db.init_app(app)
    else:
        app.config.update(config)
    if celery is not None:
        from .celery_flask import celery_init_app
        from .celery_flask import celery_settings

        app.config.update(
            PLOINTS_DISPATCH="celery",
            PLOINTS_CELERY_QUEUE=celery["queue"],
            PLOINTS_CELERY_RETRY_BACKOFF=0.2,
            PLOINTS_CELERY_RETRY_BACKOFF_MAX=0.2,
            CELERY=celery_settings(celery["broker"]),
        )
        celery_init_app(app)
    webhooks = PlointsWebhooks(app)

    @webhooks.on_any
    def handle(event: Event) -> None:
        if event.data.get("fail") and journal.first_attempt(event.account, event.id):
            journal.record(event.account, event.id, "failed")
            raise RuntimeError(f"broken on purpose on {event.id!r}")
        journal.record(event.account, event.id, "ok")

    @webhooks.on("customer.tier_changed", latest_by=_customer, name="tier")
    def tier(event: Event) -> None:
        journal.record(event.account, event.id, "tier")

    return app


def _customer(event: Event) -> object:
    return event.data["customerEmail"]


def close_app(app: Flask) -> None:
    """Close the connections of ``app``'s store and dispatcher."""
    receiver = app.extensions["ploints"]["ploints"]
    close = getattr(receiver.dispatcher, "close", None)
    if close is not None:
        close()
    client = getattr(receiver.store, "client", None)
    if client is not None:
        client.close()
    if "sqlalchemy" in app.extensions:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()
    engine = getattr(receiver.store, "engine", None)
    if engine is not None:
        engine.dispose()


class SilentProxy:
    """A TCP forwarder on a loopback port in front of ``target`` that can
    fall silent: it keeps every connection open and accepts new ones, but
    passes no byte either way. :meth:`restore` then drops every connection
    (with whatever it held back, so nothing sent in the silence arrives
    late) and forwards again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.silent = False
        self.closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent = True

    def restore(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            self.silent = False
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self.listener.close()
        self.restore()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self.closed:
                    client.close()
                    return
                self._sockets.add(client)
                if self.silent:
                    continue  # held, never forwarded; dropped by restore()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._drop(client)
                continue
            with self._lock:
                if client not in self._sockets:  # restored meanwhile
                    upstream.close()
                    continue
                self._sockets.add(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _drop(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            sock.close()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self.closed:
                if self.silent:
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    if self.silent:
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._drop(a, b)


def _worker_app() -> Flask:
    # The worker's app: the cell and backend the test gave in
    # PLOINTS_CELERY_TEST_CONFIG, its journal in Redis.
    spec = json.loads(os.environ["PLOINTS_CELERY_TEST_CONFIG"])
    [cell] = [cell for cell in EVERY_CELL if cell.id == spec["matrix_cell"]]
    backend = Backend(cell.store, spec["url"], spec["name"])
    journal = Journal(os.environ["PLOINTS_CELERY_TEST_REDIS"], spec["journal"])
    namespace = os.environ["PLOINTS_CELERY_TEST_NAMESPACE"]
    return create_app(
        cell,
        backend,
        journal,
        celery={"broker": os.environ["PLOINTS_CELERY_TEST_BROKER"], "queue": namespace},
    )


if "matrix_cell" in os.environ.get("PLOINTS_CELERY_TEST_CONFIG", ""):
    flask_app = _worker_app()
    celery = flask_app.extensions["celery"]
