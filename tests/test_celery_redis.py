"""Celery dispatch on a Redis broker, against real workers.

Each test starts its own ``redis-server`` as the broker, on a free loopback
port with its files in the test's tmp dir (the machine's Redis on 6379 keeps
the dedupe store and the handlers' records, and is never restarted). The
broker runs the docs' ``docs/examples/redis_broker.conf``, which persists
every write before answering it (``appendonly yes``, ``appendfsync
always``), unless a test turns the append-only file off. The workers' Redis
transport gives back unacknowledged messages after a ``visibility_timeout``
of :data:`VISIBILITY` seconds and looks for them every second.

What the tests show:

* ``test_queued_then_processed_once``: a ``202`` means the task is in the
  broker's list; a worker runs the handler once, the message is
  acknowledged (nothing left unacked), and the next delivery is a duplicate.
* ``test_failing_handler_retries_then_fails``: a handler that always fails
  is tried 1 + ``PLOINTS_CELERY_MAX_RETRIES`` times through the broker and
  ends failed, which ``flask ploints failed`` lists.
* ``test_worker_killed`` (with the Redis and the PostgreSQL dedupe stores):
  the message of a worker SIGKILLed mid-task stays unacked in Redis, and a
  new worker gets it back only after the visibility timeout; the effect
  happens once.
* ``test_pool_child_killed``: a SIGKILLed prefork child's task is given
  back by its parent at once, not after the visibility timeout, and runs
  once.
* ``test_task_longer_than_the_visibility_timeout``: a task that runs
  longer than the visibility timeout is not delivered to a second worker,
  since its worker renews the message's visibility while it runs.
* ``test_broker_restarted``: events accepted before the broker is killed
  (SIGKILL, no clean shutdown) are processed after it restarts; while it is
  down the endpoint answers ``503`` with ``Retry-After`` at once and
  releases the claim; after the restart the endpoint and a running worker
  reconnect on their own.
* ``test_without_aof_a_restart_loses_accepted_events``: the same crash
  with RDB snapshots alone loses an event that was answered ``202``, and its
  id stays claimed.
* ``test_broker_never_answers``: a broker that accepts connections but never
  answers gets a ``503`` within the publish timeout.
* ``test_the_docs_example``: the docs' Redis settings, on a broker that runs
  the docs' ``redis.conf``.

Without a broker: a Redis broker whose visibility timeout is within the
longest wait between retries gets a :class:`~flask_ploints.PlointsWarning`
at start-up, and only then.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import typing as t
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from flask import Flask

from flask_ploints import PlointsWarning
from flask_ploints._celery import TASK_NAME
from flask_ploints._cli import ploints
from flask_ploints.testing import PlointsClient

from .celery_app import Recorder
from .celery_support import WAIT
from .celery_support import Workers
from .celery_support import assert_duplicate
from .celery_support import assert_in_flight
from .celery_support import assert_queued
from .celery_support import drain
from .celery_support import make_app
from .celery_support import store_of
from .celery_support import until
from .support import build_app
from .support import missing

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
#: The broker's redis.conf that the docs show.
CONF = EXAMPLES / "redis_broker.conf"
#: The workers' visibility timeout, in seconds.
VISIBILITY = 3
#: Longer than any publish may take: PLOINTS_CELERY_PUBLISH_TIMEOUT is 2 s.
PUBLISH_BOUND = 3.0


class RedisBroker:
    """A ``redis-server`` of one test, which it may kill and start again
    with its data.

    :param binary: the ``redis-server`` to run.
    :param directory: where its append-only file and log go.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, aof: bool = True) -> None:
        """Start the server with the docs' ``redis_broker.conf`` and wait
        until it answers. Without ``aof``, RDB snapshots (an hour apart)
        take the place of the append-only file.
        """
        # Later options override earlier ones and the file's.
        persistence = ["--save", ""] if aof else ["--appendonly", "no", "--save", "3600 1"]
        self.process = subprocess.Popen(
            [
                self.binary,
                str(CONF),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log()
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                return False

        until(answers, "redis-server to answer")

    def kill(self) -> None:
        """SIGKILL the server: what a crash or a lost machine does."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(WAIT)
        self.client.connection_pool.disconnect()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def queued(self, queue: str) -> list[dict[str, t.Any]]:
        """The messages waiting in ``queue``, oldest first."""
        return [json.loads(raw) for raw in reversed(self.client.lrange(queue, 0, -1))]

    def unacked(self) -> int:
        """How many messages workers took and did not acknowledge yet."""
        return int(self.client.hlen("unacked"))

    def consumers(self) -> int:
        """How many connections wait for messages (a worker's BRPOP)."""
        return sum(1 for client in self.client.client_list() if client.get("cmd") == "brpop")


@pytest.fixture
def broker(tmp_path: Path) -> t.Iterator[RedisBroker]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).is_file():
        missing("redis-server is not installed")
    directory = tmp_path / "broker"
    directory.mkdir()
    broker = RedisBroker(binary, directory)
    broker.start()
    yield broker
    if broker.process is not None and broker.process.poll() is None:
        broker.kill()
    broker.client.close()


@pytest.fixture
def recorder(redis_url: str, unique: str) -> t.Iterator[Recorder]:
    recorder = Recorder(redis_url, unique)
    yield recorder
    recorder.forget()
    recorder.close()


@pytest.fixture
def workers(
    broker: RedisBroker, redis_url: str, unique: str, tmp_path: Path, recorder: Recorder
) -> t.Iterator[Workers]:
    workers = Workers(broker.url, redis_url, unique, tmp_path, lambda: broker.consumers() > 0)
    workers.celery = {
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    }
    yield workers
    workers.stop()


def _sender(workers: Workers) -> t.Iterator[tuple[Flask, PlointsClient]]:
    return make_app(workers.broker_url, workers.redis_url, workers.namespace, **workers.config)


@pytest.fixture
def sender(workers: Workers) -> t.Iterator[tuple[Flask, PlointsClient]]:
    """The endpoint's app in this process, with the workers' settings."""
    yield from _sender(workers)


def _event_id(message: dict[str, t.Any]) -> str:
    """The event id in a queued task message."""
    assert message["headers"]["task"] == TASK_NAME
    args = json.loads(base64.b64decode(message["body"]))[0]
    return str(json.loads(args[1])["id"])


def _assert_unavailable(client: PlointsClient, app: Flask, event_id: str) -> None:
    started = time.monotonic()
    response = client.send("points.earned", id=event_id)
    assert time.monotonic() - started < PUBLISH_BOUND
    assert response.status_code == 503
    assert response.get_json() == {"error": "event queue unavailable"}
    assert response.headers["Retry-After"] == "60"
    # Released: the sender's retry claims it again rather than a 409.
    assert store_of(app).get(event_id) is None


def test_queued_then_processed_once(
    broker: RedisBroker,
    workers: Workers,
    sender: tuple[Flask, PlointsClient],
    recorder: Recorder,
) -> None:
    app, client = sender
    assert_queued(client.send("points.earned", id="evt_happy"))
    assert [_event_id(message) for message in broker.queued(workers.namespace)] == ["evt_happy"]
    workers.start()
    until(lambda: recorder.count("event_processed") == {"evt_happy": 1}, "the event_processed")
    assert recorder.count("effects") == {"evt_happy": 1}
    assert_duplicate(client.send("points.earned", id="evt_happy"))
    drain(client, recorder)
    assert recorder.count("starts") == {"evt_happy": 1, "evt_drain": 1}
    stored = store_of(app).get("evt_happy")
    assert stored is not None
    assert (stored.status, stored.attempts) == ("done", 1)
    assert broker.queued(workers.namespace) == []
    until(lambda: broker.unacked() == 0, "the acknowledgements")


def test_failing_handler_retries_then_fails(
    broker: RedisBroker, workers: Workers, recorder: Recorder
) -> None:
    workers.config = {
        "PLOINTS_CELERY_MAX_RETRIES": 2,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
        "PLOINTS_CELERY_RETRY_BACKOFF_MAX": 0.3,
    }
    made = _sender(workers)
    app, client = next(made)
    try:
        assert_queued(client.send("points.earned", {"fail": True}, id="evt_bad"))
        workers.start()
        until(lambda: recorder.count("handler_failed") == {"evt_bad": 1}, "the worker to give up")
        assert recorder.count("starts") == {"evt_bad": 3}
        assert recorder.count("effects") == {}
        stored = store_of(app).get("evt_bad")
        assert stored is not None
        # The worker's three attempts, though its retries kept one claim.
        assert (stored.status, stored.attempts) == ("failed", 3)
        assert stored.error is not None
        assert stored.error.endswith("RuntimeError: handler broke on purpose on evt_bad\n")
        log = workers.output()
        assert log.count("failed (attempt") == 2
        assert "event 'evt_bad' ('points.earned') failed after 3 attempt(s)" in log

        listed = app.test_cli_runner().invoke(ploints, ["failed"])
        assert listed.exit_code == 0, listed.output
        lines = listed.output.splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("evt_bad  ")
        assert lines[0].endswith("Z  attempts=3  RuntimeError: handler broke on purpose on evt_bad")
        # Every attempt was acknowledged: nothing waits in the queue or a worker.
        assert broker.queued(workers.namespace) == []
        until(lambda: broker.unacked() == 0, "the acknowledgements")
    finally:
        next(made, None)


@pytest.fixture(params=["redis", "postgresql"])
def dedupe_store(request: pytest.FixtureRequest, unique: str) -> t.Iterator[dict[str, t.Any]]:
    """The config keys of the dedupe store: the Redis of the records, or a
    PostgreSQL table of this test's own.
    """
    if request.param == "redis":
        yield {}
        return
    url = request.getfixturevalue("postgres_url")
    yield {"PLOINTS_DEDUPE_STORE": url, "PLOINTS_SQL_TABLE": unique}
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS "{unique}"'))
    engine.dispose()


def test_worker_killed(
    broker: RedisBroker, workers: Workers, recorder: Recorder, dedupe_store: dict[str, t.Any]
) -> None:
    workers.config = dedupe_store
    made = _sender(workers)
    _, client = next(made)
    try:
        first = workers.start()
        sent = time.monotonic()
        assert_queued(client.send("points.earned", {"sleep": 60}, id="evt_kill"))
        until(lambda: recorder.count("starts") == {"evt_kill": 1}, "the handler to start")
        workers.kill(first)
        until(lambda: broker.consumers() == 0, "Redis to see the worker's connections drop")
        # Redis cannot tell a dead consumer from a slow one: the message
        # stays unacked, out of the queue, until the visibility timeout.
        assert broker.queued(workers.namespace) == []
        assert broker.unacked() == 1
        assert recorder.count("effects") == {}
        assert_in_flight(client.send("points.earned", id="evt_kill"))

        workers.start()
        until(lambda: recorder.count("starts") == {"evt_kill": 2}, "the redelivered run")
        assert time.monotonic() - sent >= VISIBILITY
        until(lambda: recorder.count("event_processed") == {"evt_kill": 1}, "the commit")
        assert recorder.count("effects") == {"evt_kill": 1}
        assert_duplicate(client.send("points.earned", id="evt_kill"))
        drain(client, recorder)
        assert recorder.count("effects") == {"evt_kill": 1, "evt_drain": 1}
        assert recorder.count("starts") == {"evt_kill": 2, "evt_drain": 1}
        until(lambda: broker.unacked() == 0, "the acknowledgements")
    finally:
        next(made, None)


def test_broker_restarted(
    broker: RedisBroker,
    workers: Workers,
    sender: tuple[Flask, PlointsClient],
    recorder: Recorder,
) -> None:
    app, client = sender
    assert_queued(client.send("points.earned", id="evt_before_1"))
    assert_queued(client.send("points.earned", id="evt_before_2"))
    broker.kill()
    _assert_unavailable(client, app, "evt_down")
    _assert_unavailable(client, app, "evt_down")

    broker.start()
    assert [_event_id(message) for message in broker.queued(workers.namespace)] == [
        "evt_before_1",
        "evt_before_2",
    ]
    assert_queued(client.send("points.earned", id="evt_down"))
    workers.start()
    expected = {"evt_before_1": 1, "evt_before_2": 1, "evt_down": 1}
    until(lambda: recorder.count("event_processed") == expected, "the accepted events")

    # Now with a worker connected: it reconnects after the restart, and
    # the endpoint's pooled connections are replaced.
    broker.kill()
    broker.start()
    assert_queued(client.send("points.earned", id="evt_after"))
    expected["evt_after"] = 1
    until(lambda: recorder.count("event_processed") == expected, "the worker to reconnect")
    assert recorder.count("effects") == expected


def test_without_aof_a_restart_loses_accepted_events(
    broker: RedisBroker, workers: Workers, sender: tuple[Flask, PlointsClient]
) -> None:
    broker.kill()
    broker.start(aof=False)
    assert _config(broker, "appendonly", "save") == {"appendonly": "no", "save": "3600 1"}
    app, client = sender
    assert_queued(client.send("points.earned", id="evt_lost"))
    assert [_event_id(message) for message in broker.queued(workers.namespace)] == ["evt_lost"]
    broker.kill()
    broker.start(aof=False)
    assert broker.queued(workers.namespace) == []
    # The claim is still held: Ploints does not resend an event it got a
    # 2xx for, and a resend from its dashboard is in flight until the
    # lease (PLOINTS_CELERY_LEASE) lapses.
    assert_in_flight(client.send("points.earned", id="evt_lost"))
    stored = store_of(app).get("evt_lost")
    assert stored is not None
    assert stored.status == "in_flight"


@pytest.mark.usefixtures("recorder")
def test_broker_never_answers(redis_url: str, unique: str) -> None:
    with socket.socket() as silent:
        # Accepts connections (the kernel's backlog) but never answers.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        made = make_app(
            f"redis://127.0.0.1:{port}/0", redis_url, unique, PLOINTS_CELERY_PUBLISH_TIMEOUT=1
        )
        app, client = next(made)
        try:
            _assert_unavailable(client, app, "evt_silent")
            _assert_unavailable(client, app, "evt_silent")
        finally:
            next(made, None)


def test_pool_child_killed(
    broker: RedisBroker,
    workers: Workers,
    sender: tuple[Flask, PlointsClient],
    recorder: Recorder,
) -> None:
    """A dead prefork child's task is given back by its parent at once: with
    an hour's visibility timeout, nothing else could bring it back.
    """
    workers.celery["broker_transport_options"]["visibility_timeout"] = 3600
    _, client = sender
    parent = workers.start(pool="prefork")
    assert_queued(client.send("points.earned", {"sleep": 60}, id="evt_child"))
    until(lambda: recorder.count("starts") == {"evt_child": 1}, "the handler to start")
    child = recorder.count("pid")["evt_child"]
    assert child != parent.pid
    os.kill(child, signal.SIGKILL)

    until(lambda: recorder.count("event_processed") == {"evt_child": 1}, "the redelivered run")
    assert recorder.count("effects") == {"evt_child": 1}
    assert recorder.count("starts") == {"evt_child": 2}
    assert recorder.count("pid")["evt_child"] != child
    assert parent.poll() is None
    assert "WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)" in workers.output()
    assert_duplicate(client.send("points.earned", id="evt_child"))
    until(lambda: broker.unacked() == 0, "the acknowledgement")


def test_task_longer_than_the_visibility_timeout(
    broker: RedisBroker,
    workers: Workers,
    sender: tuple[Flask, PlointsClient],
    recorder: Recorder,
) -> None:
    """The worker renews its running task's visibility: an idle second
    worker never gets a copy, though the task runs twice as long as the
    visibility timeout.
    """
    _, client = sender
    workers.start()
    workers.start()
    assert_queued(client.send("points.earned", {"sleep": 2 * VISIBILITY}, id="evt_long"))
    until(lambda: recorder.count("event_processed") == {"evt_long": 1}, "the commit")
    until(lambda: broker.unacked() == 0, "the acknowledgement")
    # A copy would be waiting in the queue, held by a worker, or received.
    assert broker.queued(workers.namespace) == []
    assert recorder.count("starts") == {"evt_long": 1}
    assert recorder.count("effects") == {"evt_long": 1}
    log = workers.output()
    assert log.count("] received") == 1
    assert log.count("] succeeded in ") == 1
    assert "went back to the queue" not in log
    assert "processed after its claim lapsed" not in log


def _config(broker: RedisBroker, *names: str) -> dict[str, str]:
    found: dict[t.Any, t.Any] = {}
    for name in names:
        found.update(broker.client.config_get(name))
    return {
        (key.decode() if isinstance(key, bytes) else key): (
            value.decode() if isinstance(value, bytes) else value
        )
        for key, value in found.items()
    }


def test_the_docs_example(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert _config(broker, "appendonly", "appendfsync", "maxmemory-policy") == {
        "appendonly": "yes",
        "appendfsync": "always",
        "maxmemory-policy": "noeviction",
    }
    monkeypatch.setenv("PLOINTS_WEBHOOK_SECRET", "whsec_docs")
    monkeypatch.setenv("PLOINTS_DEDUPE_STORE", f"sqlite:///{tmp_path / 'events.db'}")
    monkeypatch.setenv("CELERY_BROKER_URL", broker.url)
    spec = importlib.util.spec_from_file_location("celery_redis", EXAMPLES / "celery_redis.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.create_app()
    app.testing = True
    celery_app = app.extensions["celery"]
    assert celery_app.conf.broker_transport_options == {"visibility_timeout": 3600}
    receiver = app.extensions["ploints"]["ploints"]
    assert receiver.dispatcher.lease == 3600
    try:
        assert_queued(PlointsClient(app).send("points.earned", id="evt_docs"))
        assert [_event_id(message) for message in broker.queued("ploints")] == ["evt_docs"]
    finally:
        receiver.dispatcher.close()
        receiver.store.engine.dispose()


# Without a worker or a broker: the start-up check of the visibility timeout.


def _celery_on(broker: str, **transport_options: t.Any) -> Celery:
    celery_app = Celery("ploints_unit", broker=broker, set_as_current=False)
    if transport_options:
        celery_app.conf.broker_transport_options = transport_options
    return celery_app


def test_a_visibility_timeout_within_a_retry_wait_warns() -> None:
    # The default retries wait 10, 20, 40, 80 then 160 s.
    celery_app = _celery_on("redis://127.0.0.1:1/0", visibility_timeout=160)
    with pytest.warns(PlointsWarning) as caught:
        build_app({"PLOINTS_DISPATCH": "celery", "PLOINTS_CELERY_APP": celery_app})
    assert [str(warning.message) for warning in caught] == [
        "the Redis broker's visibility_timeout (160 s) is not longer than the longest wait"
        " between retries (160 s, from PLOINTS_CELERY_RETRY_BACKOFF and"
        " PLOINTS_CELERY_RETRY_BACKOFF_MAX): Redis gives a retry still waiting for its countdown"
        " to a second worker, and the handlers run twice; raise"
        " broker_transport_options['visibility_timeout']"
    ]
    assert caught[0].filename == str(Path(__file__).parent / "support.py")


@pytest.mark.parametrize(
    ("broker", "options", "config"),
    [
        ("redis://127.0.0.1:1/0", {}, {}),
        ("redis://127.0.0.1:1/0", {"visibility_timeout": 161}, {}),
        ("redis://127.0.0.1:1/0", {"visibility_timeout": 10}, {"PLOINTS_CELERY_MAX_RETRIES": 0}),
        (
            "redis://127.0.0.1:1/0",
            {"visibility_timeout": 10},
            {"PLOINTS_CELERY_RETRY_BACKOFF_MAX": 9},
        ),
        ("amqp://guest:guest@127.0.0.1:1//", {"visibility_timeout": 10}, {}),
    ],
    ids=["default", "longer", "no_retries", "short_retries", "amqp"],
)
def test_a_visibility_timeout_beyond_every_retry_wait_is_quiet(
    broker: str, options: dict[str, t.Any], config: dict[str, t.Any]
) -> None:
    # filterwarnings = error: a warning would fail the test.
    app, _ = build_app(
        {
            "PLOINTS_DISPATCH": "celery",
            "PLOINTS_CELERY_APP": _celery_on(broker, **options),
            **config,
        }
    )
    assert app.extensions["ploints"]["ploints"].dispatcher.celery_app.conf.broker_url == broker
