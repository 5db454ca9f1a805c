"""Exactly-once effects with the dedupe record in the app's own database
(``PLOINTS_DEDUPE_STORE = db``), under crashes of real processes.

The app is :mod:`tests.crash_app`: Flask-SQLAlchemy, a handler that adds
one credit row per event through ``db.session`` and kills its own process at
a chosen point of the first attempt at each event. The gunicorn tests run it
under ``gunicorn --preload`` with 2 sync workers (the arbiter replaces a
killed worker) on PostgreSQL and on an SQLite file, one server per database
and store for the module; each test sends its own events. A sender in the
test posts each event and retries every answer but a 2xx, as Ploints does,
on Ploints' schedule 600 times faster (retries after 0.1, 0.5, 3 and 12 s).

* ``test_crash_before_handler``: the worker is SIGKILLed in the handler
  before its write. The sender's first attempt gets no answer, its retry
  ``200`` processed; one credit row per event, written by another worker.
* ``test_crash_inside_handler_after_flush``: SIGKILLed after the write was
  flushed, before the commit: the database rolls the write and the dedupe
  row back together, so the retry is processed at once (no claim to wait
  out) and each event has one credit row, not the flushed one.
* ``test_crash_after_commit_before_answer``: SIGKILLed just after the commit
  (:func:`flask_ploints.after_commit`), before the answer: the retry is a
  ``200`` duplicate, and the one credit row is the dead worker's.
* ``test_non_transactional_store_doubles``: the same crash after the write
  with the SQL store (:class:`~flask_ploints.stores.SQLAlchemyStore`, its
  clock 10 times faster so that its 10 s lease lapses in 1 s) and a handler
  that commits its own write: the retry, once the lease lapsed, writes the
  credit again; every event has two rows. This is what the session store
  is for.

The Celery tests queue through a real RabbitMQ to real ``celery worker``
processes (solo pool, the task ``acks_late``) with the session store on
PostgreSQL:

* ``test_celery_worker_killed_mid_task_exactly_once``: the worker exits
  (``os._exit(1)``) inside the handler after flushing; RabbitMQ gives the
  message back, a new worker takes over the endpoint's claim and commits:
  one credit row, the event done, a later delivery a duplicate.
* ``test_celery_handler_failure_retries_exactly_once``: the handler raises
  after its write on the first attempt; the rolled back write is gone, the
  task's retry commits one credit row.
* ``test_celery_handler_slower_than_transaction_timeout_commits``: a
  worker's transaction is bounded by its claim's lease, not by the store's
  ``transaction_timeout`` (1 s here): a 1.5 s handler commits at once.
* ``test_celery_claim_lapsed_in_queue_then_handler_fails_retries``: the
  endpoint's claim lapses while the task waits (a 1 s lease); the worker
  claims the event again durably, so its handler's failure is retried, and
  the retry commits one credit row.

The sender, the servers and the workers are in :mod:`tests.crash_support`.
Every wait is bounded.
"""

from __future__ import annotations

import typing as t
import uuid
from pathlib import Path

import pytest

from flask_ploints._cli import ploints
from flask_ploints.testing import PlointsClient

from . import crash_app
from .celery_support import delete_queue
from .crash_app import Journal
from .crash_support import EVENTS
from .crash_support import Delivery
from .crash_support import Queued
from .crash_support import Server
from .crash_support import Workers
from .support import POSTGRES_URL
from .support import require_service
from .test_celery import _queue_state
from .test_celery import _until
from .test_faults import WAIT
from .test_faults import Gunicorn

PROCESSED = b'{"received": true}\n'
DUPLICATE = b'{"received": true, "duplicate": true}\n'


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The app's database: the test PostgreSQL, or an SQLite file."""
    if request.param == "postgresql":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        return POSTGRES_URL
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'app.db'}"


def _serve(database: str, directory: Path, **options: t.Any) -> t.Iterator[Server]:
    name = f"ploints_crash_{uuid.uuid4().hex[:8]}"
    (directory / "crashes").mkdir()
    env = crash_app.environment(database, name, directory, **options)
    app = crash_app.create_app(env)
    crash_app.prepare(app)
    try:
        # Preloaded: the arbiter forks a new worker rather than importing
        # the app again, so a killed worker is replaced in milliseconds.
        gunicorn = Gunicorn(
            env,
            2,
            directory / "gunicorn.log",
            app="tests.crash_app:create_app()",
            options=["--preload"],
        )
        try:
            yield Server(gunicorn, app, Journal(directory))
        finally:
            gunicorn.stop()
    finally:
        crash_app.drop(app)


@pytest.fixture(scope="module")
def session_server(database: str, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Server]:
    """A server with the session store (``PLOINTS_DEDUPE_STORE = db``)."""
    yield from _serve(database, tmp_path_factory.mktemp("session"))


@pytest.fixture(scope="module")
def plain_server(database: str, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Server]:
    """A server with the SQL store on the same database, its clock 10
    times faster, and a handler that commits its own write.
    """
    yield from _serve(database, tmp_path_factory.mktemp("plain"), store=database, speed=10.0)


def _ids(deliveries: list[Delivery]) -> list[str]:
    return [delivery.event_id for delivery in deliveries]


def _assert_the_retry_processed_each_once(server: Server, name: str, crash: str) -> None:
    # Each event's first attempt is killed, unanswered; the first retry
    # processes it: one row each, the retry's, not one the killed worker
    # wrote.
    before = server.killed()
    deliveries = server.send(name, crash)
    ids = _ids(deliveries)
    assert [delivery.statuses for delivery in deliveries] == [[0, 200]] * EVENTS
    assert [delivery.last for delivery in deliveries] == [PROCESSED] * EVENTS
    crashes = server.crashes(ids, before)
    written = server.credit_pids(ids)
    assert sorted(written) == ids
    for event_id in ids:
        assert len(written[event_id]) == 1
        assert written[event_id] != [crashes[event_id]]
    assert server.states(ids) == dict.fromkeys(ids, "done")
    assert {key: server.journal.starts()[key] for key in ids} == dict.fromkeys(ids, 2)


def test_crash_before_handler(session_server: Server) -> None:
    _assert_the_retry_processed_each_once(session_server, "before", "before")


def test_crash_inside_handler_after_flush(session_server: Server) -> None:
    # The flushed write and the dedupe row went with the dead connection:
    # the first retry is processed, without waiting for a claim to lapse.
    _assert_the_retry_processed_each_once(session_server, "inside", "inside")


def test_crash_after_commit_before_answer(session_server: Server) -> None:
    before = session_server.killed()
    deliveries = session_server.send("after", "after_commit")
    ids = _ids(deliveries)
    # Committed, then killed before answering: the retry is a duplicate.
    assert [delivery.statuses for delivery in deliveries] == [[0, 200]] * EVENTS
    assert [delivery.last for delivery in deliveries] == [DUPLICATE] * EVENTS
    crashes = session_server.crashes(ids, before)
    # One row each, the one the killed worker committed.
    assert session_server.credit_pids(ids) == {key: [pid] for key, pid in crashes.items()}
    assert session_server.states(ids) == dict.fromkeys(ids, "done")
    assert {key: session_server.journal.starts()[key] for key in ids} == dict.fromkeys(ids, 1)


def test_non_transactional_store_doubles(plain_server: Server) -> None:
    before = plain_server.killed()
    # At once: each event waits for its claim's lease (1 s) to lapse.
    deliveries = plain_server.send("plain", "inside", together=True)
    ids = _ids(deliveries)
    for delivery in deliveries:
        # No answer, then in flight while the dead worker's claim holds,
        # then processed again.
        first, *held, last = delivery.statuses
        assert (first, last) == (0, 200)
        assert held
        assert set(held) == {409}
        assert delivery.last == PROCESSED
    crashes = plain_server.crashes(ids, before)
    written = plain_server.credit_pids(ids)
    assert sorted(written) == ids
    for event_id in ids:
        # The killed worker's committed credit, and the retry's: a double.
        assert len(written[event_id]) == 2
        assert written[event_id][0] == crashes[event_id]
        assert written[event_id][1] != crashes[event_id]
    assert plain_server.states(ids) == dict.fromkeys(ids, "done")
    assert {key: plain_server.journal.starts()[key] for key in ids} == dict.fromkeys(ids, 2)


# Celery, on RabbitMQ.


def _session_env(**more: t.Any) -> pytest.MarkDecorator:
    """Run a Celery test with more ``PLOINTS_CRASH_*`` variables, and more
    config in ``config``.
    """
    return pytest.mark.parametrize("queued", [pytest.param(more, id="postgresql")], indirect=True)


@pytest.fixture(params=[pytest.param({}, id="postgresql")])
def queued(
    request: pytest.FixtureRequest, postgres_url: str, amqp_url: str, unique: str, tmp_path: Path
) -> t.Iterator[Queued]:
    """The endpoint's app in this process, with Celery dispatch and the
    session store on PostgreSQL; its workers exit with ``os._exit(1)``.
    """
    (tmp_path / "crashes").mkdir()
    config = {
        "PLOINTS_CELERY_MAX_RETRIES": 2,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
        "PLOINTS_CELERY_RETRY_BACKOFF_MAX": 0.3,
    }
    more = dict(request.param)
    config.update(more.pop("config", {}))
    env = crash_app.environment(
        postgres_url, unique, tmp_path, death="exit", broker=amqp_url, config=config
    )
    env.update(more)
    app = crash_app.create_app(env)
    crash_app.prepare(app)
    workers = Workers(env, tmp_path)
    try:
        yield Queued(app, PlointsClient(app), workers, Journal(tmp_path))
    finally:
        workers.stop()
        delete_queue(amqp_url, unique)
        app.extensions["ploints"]["ploints"].dispatcher.close()
        crash_app.drop(app)


def _queue(queued: Queued, event_id: str, crash: str) -> None:
    response = queued.client.send("points.earned", {"amount": 5, "crash": crash}, id=event_id)
    assert response.status_code == 202
    assert response.get_json() == {"received": True, "queued": True}


def test_celery_worker_killed_mid_task_exactly_once(queued: Queued) -> None:
    event_id = "evt_celery_killed"
    # Queued before the worker starts: see tests/test_celery.py.
    _queue(queued, event_id, "inside")
    first = queued.workers.start(dies=True)
    assert first.wait(WAIT) == 1
    assert queued.journal.crashes() == {event_id: first.pid}
    # The flushed write rolled back; the endpoint's claim still holds.
    assert crash_app.credit_pids(queued.app) == {}
    assert queued.state(event_id) == "in_flight"
    _until(
        lambda: _queue_state(queued.workers.broker, queued.workers.queue) == (1, 0),
        "RabbitMQ to give the message back",
    )

    second = queued.workers.start()
    _until(lambda: queued.state(event_id) == "done", "the redelivered run to commit")
    assert crash_app.credit_pids(queued.app) == {event_id: [second.pid]}
    assert queued.journal.starts() == {event_id: 2}
    response = queued.client.send("points.earned", {"amount": 5}, id=event_id)
    assert (response.status_code, response.get_json()) == (
        200,
        {"received": True, "duplicate": True},
    )
    assert _queue_state(queued.workers.broker, queued.workers.queue) == (0, 1)
    assert second.poll() is None


def test_celery_handler_failure_retries_exactly_once(queued: Queued) -> None:
    event_id = "evt_celery_raised"
    _queue(queued, event_id, "raise")
    worker = queued.workers.start()
    _until(lambda: queued.state(event_id) == "done", "the retry to commit")
    # Written and rolled back on the first attempt, written on the retry.
    assert crash_app.credit_pids(queued.app) == {event_id: [worker.pid]}
    assert queued.journal.starts() == {event_id: 2}
    assert queued.journal.crashes() == {event_id: worker.pid}
    log = queued.workers.output()
    assert log.count("failed (attempt 1 of 3)") == 1
    assert "failed (attempt 2" not in log
    assert worker.poll() is None


def test_celery_handler_that_always_fails_records_every_attempt(queued: Queued) -> None:
    event_id = "evt_celery_always"
    _queue(queued, event_id, "always")
    queued.workers.start()
    _until(lambda: queued.state(event_id) == "failed", "the worker to give up")
    # Each of the three attempts wrote and rolled back.
    assert crash_app.credit_pids(queued.app) == {}
    assert queued.journal.starts() == {event_id: 3}
    assert "failed after 3 attempt(s)" in queued.workers.output()
    with queued.app.app_context():
        stored = crash_app.store(queued.app).get(event_id)
    assert stored is not None
    assert stored.attempts == 3
    listed = queued.app.test_cli_runner().invoke(ploints, ["failed"])
    assert listed.exit_code == 0, listed.output
    assert f"{event_id}  " in listed.output
    assert "  attempts=3  RuntimeError: handler broke on purpose" in listed.output


@_session_env(PLOINTS_CRASH_HOLD_LIMIT="1")
def test_celery_handler_slower_than_transaction_timeout_commits(queued: Queued) -> None:
    """A worker's transaction is bounded by its lease, not by the sender's
    timeout: a handler slower than ``transaction_timeout`` still commits.
    """
    event_id = "evt_celery_slow"
    response = queued.client.send("points.earned", {"amount": 5, "sleep": 1.5}, id=event_id)
    assert response.status_code == 202
    worker = queued.workers.start()
    _until(lambda: queued.state(event_id) == "done", "the slow handler to commit")
    assert crash_app.credit_pids(queued.app) == {event_id: [worker.pid]}
    assert queued.journal.starts() == {event_id: 1}
    assert "failed (attempt" not in queued.workers.output()


@_session_env(config={"PLOINTS_CELERY_LEASE": 1})
def test_celery_claim_lapsed_in_queue_then_handler_fails_retries(queued: Queued) -> None:
    """The endpoint's claim lapsed while the task waited; the worker claims
    the event again, durably, so that its handler's failure is retried.
    """
    event_id = "evt_celery_lapsed"
    _queue(queued, event_id, "raise")
    # A lapsed claim is no longer live: the store shows nothing.
    _until(lambda: queued.state(event_id) is None, "the claim to lapse in the queue")
    worker = queued.workers.start()
    _until(lambda: queued.state(event_id) == "done", "the retry to commit")
    assert crash_app.credit_pids(queued.app) == {event_id: [worker.pid]}
    assert queued.journal.starts() == {event_id: 2}
    assert queued.workers.output().count("failed (attempt 1 of 3)") == 1
