from __future__ import annotations

import typing as t
import uuid
from pathlib import Path

import pytest
from flask import Flask

from flask_ploints import EVENT_TYPES
from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints import signals

from .support import AMQP_URL
from .support import MARIADB_URL
from .support import POSTGRES_URL
from .support import REDIS_URL
from .support import build_app
from .support import require_service

if t.TYPE_CHECKING:
    from .ordering_app import Loyalty

pytest_plugins = ["pytester"]


@pytest.fixture
def webhooks() -> PlointsWebhooks:
    return PlointsWebhooks()


@pytest.fixture
def app(webhooks: PlointsWebhooks) -> Flask:
    return build_app(webhooks=webhooks)[0]


@pytest.fixture
def calls(webhooks: PlointsWebhooks) -> list[tuple[str, str]]:
    """Every (type, id) the ``webhooks`` instance handled, in order."""
    seen: list[tuple[str, str]] = []

    @webhooks.on_any
    def record(event: Event) -> None:
        seen.append((event.type, event.id))

    return seen


@pytest.fixture
def unique() -> str:
    """A name no other test uses: a key prefix, a table, a queue."""
    return f"ploints_test_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def postgres_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture
def mariadb_url() -> str:
    require_service("MariaDB", "127.0.0.1", 3306)
    return MARIADB_URL


@pytest.fixture
def amqp_url() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL


@pytest.fixture
def restore_signals() -> t.Iterator[None]:
    """Disconnect whatever a test connects to the global signals."""
    every = [signals.signal_for(name) for name in EVENT_TYPES]
    before = {id(signal): set(signal.receivers) for signal in every if signal is not None}
    yield
    for signal in every:
        assert signal is not None
        for key in set(signal.receivers) - before[id(signal)]:
            signal.disconnect(signal.receivers[key])


@pytest.fixture
def make_loyalty(
    request: pytest.FixtureRequest, unique: str, tmp_path: Path
) -> t.Iterator[t.Callable[..., Loyalty]]:
    """Build :class:`~tests.ordering_app.Loyalty` apps of a kind, all on
    one store; what they kept is removed after the test.
    """
    # Imported here: the module needs Flask-SQLAlchemy and redis.
    from .ordering_app import Loyalty
    from .ordering_app import clean
    from .ordering_app import store_url

    made: list[tuple[str, str]] = []
    apps: list[Loyalty] = []

    def make(kind: str, **config: t.Any) -> Loyalty:
        url = store_url(request, kind, tmp_path)
        made.append((kind, url))
        apps.append(Loyalty(kind, url, unique, **config))
        return apps[-1]

    yield make
    for loyalty in apps:
        loyalty.close()
    for kind, url in set(made):
        clean(kind, url, unique)
