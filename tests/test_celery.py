"""Async processing on Celery, against a real RabbitMQ and real workers.

Each test with a worker starts ``celery -A tests.celery_app:celery worker``
as a subprocess on a queue only it uses (the ``unique`` fixture), with a
Redis store under its own prefix, and removes the worker, the queue and the
keys afterwards. The handler records its starts and effects in Redis (see
:mod:`tests.celery_app`), where every process can see them. Every wait is
bounded, and none is a fixed sleep: to show that something did not happen,
a test queues one more event and waits until the worker processed it, by
which time anything queued before it has run.

What the tests show:

* ``test_queued_then_processed_once``: a delivery is answered ``202``, a
  worker runs the handler once and commits the id; a later delivery of the
  same event is answered ``200`` duplicate.
* ``test_duplicate_while_queued_or_running``: while the event waits in the
  queue (no worker yet) and while its slow handler runs, a duplicate
  delivery is answered ``409``; the handler runs once.
* ``test_broker_refuses`` and ``test_broker_never_answers``: with the broker
  down, or accepting connections but never answering, the delivery is
  answered ``503`` within 3 s and the claim is released.
* ``test_worker_killed`` (SIGKILL of a solo worker, redelivered by RabbitMQ
  to a new worker) and ``test_pool_child_killed`` (SIGKILL of a prefork
  child, given back by its parent): the event's effect happens exactly once.
* ``test_failing_handler_gives_up_then_replays``: a handler that always
  fails is tried 1 + ``PLOINTS_CELERY_MAX_RETRIES`` times, the event ends
  failed with its traceback in the store and ``handler_failed`` is sent
  once; after the fix, :func:`~flask_ploints.replay.replay` queues it again
  and a worker processes it.

The tests without a worker check the settings, the task's options and a
:func:`~flask_ploints.replay.replay` whose task cannot be queued; replay
with sync dispatch is tested in ``tests/test_replay.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing as t
from datetime import UTC
from datetime import datetime
from pathlib import Path

import amqp
import kombu
import pytest
import sqlalchemy as sa
from celery import Celery
from flask import Flask

from flask_ploints import ConfigError
from flask_ploints import PlointsWebhooks
from flask_ploints._celery import TASK_NAME
from flask_ploints._celery import CeleryDispatcher
from flask_ploints._dispatch import DispatchError
from flask_ploints._events import parse_event
from flask_ploints._signature import sign
from flask_ploints.delivery_log import delivery_log
from flask_ploints.delivery_log._table import make_table
from flask_ploints.replay import ReplayOutcome
from flask_ploints.replay import replay
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from . import celery_support
from .celery_app import Recorder
from .celery_support import assert_duplicate as _assert_duplicate
from .celery_support import assert_in_flight as _assert_in_flight
from .celery_support import assert_queued as _assert_queued
from .celery_support import delete_queue
from .celery_support import drain as _drain
from .celery_support import make_app as _make_app
from .celery_support import store_of as _store
from .celery_support import until as _until
from .support import SECRET
from .support import build_app


class Workers(celery_support.Workers):
    """The workers of one test, on RabbitMQ: a worker consumes once the
    queue has a consumer.
    """

    def __init__(self, amqp_url: str, redis_url: str, namespace: str, logs: Path) -> None:
        super().__init__(
            amqp_url,
            redis_url,
            namespace,
            logs,
            lambda: _queue_state(amqp_url, namespace)[1] > 0,
        )
        self.amqp_url = amqp_url


def workers_and_recorder(
    amqp_url: str, redis_url: str, unique: str, tmp_path: Path
) -> t.Iterator[tuple[Workers, Recorder]]:
    """The body of a fixture of workers on RabbitMQ and the recorder of
    what they did, both removed afterwards.
    """
    workers = Workers(amqp_url, redis_url, unique, tmp_path)
    recorder = Recorder(redis_url, unique)
    yield workers, recorder
    workers.stop()
    delete_queue(amqp_url, unique)
    recorder.forget()
    recorder.close()


def _queue_state(amqp_url: str, queue: str) -> tuple[int, int]:
    """Return (messages ready, consumers) of ``queue``; (0, 0) if missing."""
    with kombu.Connection(amqp_url, connect_timeout=2) as connection:
        channel = connection.channel()
        try:
            declared = channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return 0, 0
        return int(declared.message_count), int(declared.consumer_count)


@pytest.fixture
def recorder(redis_url: str, unique: str) -> t.Iterator[Recorder]:
    recorder = Recorder(redis_url, unique)
    yield recorder
    recorder.forget()
    recorder.close()


@pytest.fixture
def workers(
    amqp_url: str, redis_url: str, unique: str, tmp_path: Path, recorder: Recorder
) -> t.Iterator[Workers]:
    workers = Workers(amqp_url, redis_url, unique, tmp_path)
    yield workers
    workers.stop()
    delete_queue(amqp_url, unique)


@pytest.fixture
def sender(workers: Workers) -> t.Iterator[tuple[Flask, PlointsClient]]:
    """The endpoint's app in this process, with the workers' settings."""
    yield from _make_app(workers.amqp_url, workers.redis_url, workers.namespace, **workers.config)


def test_queued_then_processed_once(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    app, client = sender
    # Queued before the worker starts: see test_failing_handler_gives_up_then_replays.
    _assert_queued(client.send("points.earned", id="evt_happy"))
    workers.start()
    _until(lambda: recorder.count("event_processed") == {"evt_happy": 1}, "the event_processed")
    assert recorder.count("effects") == {"evt_happy": 1}
    stored = _store(app).get("evt_happy")
    assert stored is not None
    assert stored.status == "done"
    _assert_duplicate(client.send("points.earned", id="evt_happy"))
    _drain(client, recorder)
    assert recorder.count("starts") == {"evt_happy": 1, "evt_drain": 1}
    assert recorder.count("event_processed") == {"evt_happy": 1, "evt_drain": 1}
    stored = _store(app).get("evt_happy")
    assert stored is not None
    assert (stored.status, stored.attempts) == ("done", 1)


def test_latest_by_is_judged_in_the_worker(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    _, client = sender
    now = int(time.time())

    def change(event_id: str, tier: str, seconds: int) -> None:
        data = {"customerEmail": "jane@example.com", "previousTier": "Bronze", "newTier": tier}
        moment = datetime.fromtimestamp(now + seconds, tz=UTC)
        _assert_queued(client.send("customer.tier_changed", data, id=event_id, timestamp=moment))

    # All queued: the endpoint judges nothing; the worker, at run time.
    change("evt_gold", "Gold", -60)
    change("evt_silver", "Silver", -3600)
    change("evt_platinum", "Platinum", 0)
    workers.start()
    _drain(client, recorder)
    tiers = recorder.client.lrange(recorder.key("tiers"), 0, -1)
    assert tiers == [b"evt_gold", b"evt_platinum"]
    assert recorder.count("event_processed") == {
        "evt_gold": 1,
        "evt_silver": 1,
        "evt_platinum": 1,
        "evt_drain": 1,
    }


def test_duplicate_while_queued_or_running(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    _, client = sender
    data = {"sleep": 1.5}
    _assert_queued(client.send("points.earned", data, id="evt_slow"))
    assert _queue_state(workers.amqp_url, workers.namespace) == (1, 0)
    _assert_in_flight(client.send("points.earned", data, id="evt_slow"))

    workers.start()
    _until(lambda: recorder.count("starts") == {"evt_slow": 1}, "the handler to start")
    _assert_in_flight(client.send("points.earned", data, id="evt_slow"))

    _until(lambda: recorder.count("effects") == {"evt_slow": 1}, "the handler to finish")
    _until(lambda: recorder.count("event_processed") == {"evt_slow": 1}, "the commit")
    _assert_duplicate(client.send("points.earned", data, id="evt_slow"))
    assert _queue_state(workers.amqp_url, workers.namespace) == (0, 1)
    assert recorder.count("starts") == {"evt_slow": 1}


@pytest.fixture
def unreachable(redis_url: str, unique: str) -> t.Iterator[t.Callable[[str], PlointsClient]]:
    made: list[t.Iterator[tuple[Flask, PlointsClient]]] = []

    def make(broker_url: str) -> PlointsClient:
        made.append(_make_app(broker_url, redis_url, unique))
        return next(made[-1])[1]

    yield make
    for iterator in made:
        next(iterator, None)
    Recorder(redis_url, unique).forget()


def _assert_unavailable_and_released(client: PlointsClient, app: Flask) -> None:
    for _ in range(2):
        started = time.monotonic()
        response = client.send("points.earned", id="evt_down")
        assert time.monotonic() - started < 3
        assert response.status_code == 503
        assert response.get_json() == {"error": "event queue unavailable"}
        assert response.headers["Retry-After"] == "60"
        # Released: the next delivery claims it again rather than a 409.
        assert _store(app).get("evt_down") is None


def test_broker_refuses(
    unreachable: t.Callable[[str], PlointsClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = unreachable("amqp://guest:guest@127.0.0.1:1//")
    app = client.client.application
    assert isinstance(app, Flask)
    _assert_unavailable_and_released(client, app)
    assert "event 'evt_down' ('points.earned') could not be queued" in caplog.text
    assert "Connection refused" in caplog.text


def test_broker_never_answers(unreachable: t.Callable[[str], PlointsClient]) -> None:
    with socket.socket() as silent:
        # Accepts connections (the kernel's backlog) but never speaks AMQP.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = unreachable(f"amqp://guest:guest@127.0.0.1:{port}//")
        app = client.client.application
        assert isinstance(app, Flask)
        _assert_unavailable_and_released(client, app)


def test_worker_killed(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    _, client = sender
    first = workers.start()
    _assert_queued(client.send("points.earned", {"sleep": 60}, id="evt_kill"))
    _until(lambda: recorder.count("starts") == {"evt_kill": 1}, "the handler to start")
    workers.kill(first)
    assert recorder.count("effects") == {}
    # RabbitMQ saw the connection drop: the unacknowledged message is back.
    _until(
        lambda: _queue_state(workers.amqp_url, workers.namespace) == (1, 0),
        "the message to return to the queue",
    )
    _assert_in_flight(client.send("points.earned", id="evt_kill"))

    workers.start()
    _until(lambda: recorder.count("effects") == {"evt_kill": 1}, "the redelivered run")
    _until(lambda: recorder.count("event_processed") == {"evt_kill": 1}, "the commit")
    assert recorder.count("starts") == {"evt_kill": 2}
    _assert_duplicate(client.send("points.earned", id="evt_kill"))
    _drain(client, recorder)
    assert recorder.count("effects") == {"evt_kill": 1, "evt_drain": 1}
    assert recorder.count("starts") == {"evt_kill": 2, "evt_drain": 1}


def test_pool_child_killed(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    _, client = sender
    parent = workers.start(pool="prefork")
    _assert_queued(client.send("points.earned", {"sleep": 60}, id="evt_child"))
    _until(lambda: recorder.count("starts") == {"evt_child": 1}, "the handler to start")
    child = recorder.count("pid")["evt_child"]
    assert child != parent.pid
    os.kill(child, signal.SIGKILL)

    _until(lambda: recorder.count("effects") == {"evt_child": 1}, "the redelivered run")
    _until(lambda: recorder.count("event_processed") == {"evt_child": 1}, "the commit")
    assert recorder.count("starts") == {"evt_child": 2}
    assert recorder.count("pid")["evt_child"] != child
    assert parent.poll() is None
    assert "WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)" in workers.output()
    _assert_duplicate(client.send("points.earned", id="evt_child"))


def test_failing_handler_gives_up_then_replays(
    workers: Workers, recorder: Recorder, redis_url: str, unique: str
) -> None:
    workers.config = {
        "PLOINTS_CELERY_MAX_RETRIES": 2,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
        "PLOINTS_CELERY_RETRY_BACKOFF_MAX": 0.3,
    }
    made = _make_app(workers.amqp_url, redis_url, unique, **workers.config)
    app, client = next(made)
    try:
        # Queued before the worker starts: a message that reaches a solo
        # worker in its first milliseconds (Celery 5.7) leaves the next one,
        # here the retry, waiting up to 10 s in the worker's event loop.
        _assert_queued(client.send("points.earned", {"fail": True}, id="evt_bad"))
        workers.start()
        _until(lambda: recorder.count("handler_failed") == {"evt_bad": 1}, "the worker to give up")
        stored = _store(app).get("evt_bad")
        assert stored is not None
        assert (stored.status, stored.attempts) == ("failed", 3)
        assert stored.error is not None
        assert stored.error.startswith("Traceback (most recent call last):")
        assert stored.error.endswith("RuntimeError: handler broke on purpose on evt_bad\n")
        assert [event.id for event in _store(app).failed()] == ["evt_bad"]
        assert recorder.count("starts") == {"evt_bad": 3}
        assert recorder.count("effects") == {}
        log = workers.output()
        assert log.count("failed (attempt") == 2
        assert "event 'evt_bad' ('points.earned') failed after 3 attempt(s)" in log

        # Failed is not in flight: the sender's next retry may claim it.
        recorder.fix()
        assert replay(app, "evt_bad") == ReplayOutcome.QUEUED
        _until(lambda: recorder.count("effects") == {"evt_bad": 1}, "the replayed run")
        _until(lambda: recorder.count("event_processed") == {"evt_bad": 1}, "the commit")
        stored = _store(app).get("evt_bad")
        assert stored is not None
        assert stored.status == "done"
        with pytest.raises(ValueError, match="event 'evt_bad' is done, not failed"):
            replay(app, "evt_bad")
        _assert_duplicate(client.send("points.earned", {"fail": True}, id="evt_bad"))
        assert recorder.count("handler_failed") == {"evt_bad": 1}
    finally:
        next(made, None)


def _log_rows(app: Flask, event_id: str) -> list[tuple[str, str | None]]:
    return [(row.outcome, row.reason) for row in delivery_log(app).recent(event_id=event_id)]


def _csrf_token(browser: t.Any, delivery_id: int) -> str:
    page = browser.get(f"/ploints/deliveries/{delivery_id}").get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None, page
    return match.group(1)


@pytest.fixture
def log_table(postgres_url: str, unique: str) -> t.Iterator[dict[str, str]]:
    """The delivery log of the workers and the sender: a table of its own."""
    yield {"url": postgres_url, "table": unique}
    engine = sa.create_engine(postgres_url)
    try:
        make_table(unique).drop(engine, checkfirst=True)
    finally:
        engine.dispose()


def test_the_delivery_log_shows_the_queue_and_each_attempt(
    workers: Workers, recorder: Recorder, redis_url: str, unique: str, log_table: dict[str, str]
) -> None:
    workers.config = {
        "PLOINTS_CELERY_MAX_RETRIES": 1,
        "PLOINTS_CELERY_RETRY_BACKOFF": 0.2,
        "PLOINTS_CELERY_RETRY_BACKOFF_MAX": 0.3,
        "TEST_DELIVERY_LOG": log_table,
    }
    made = _make_app(workers.amqp_url, redis_url, unique, **workers.config)
    app, client = next(made)
    try:
        _assert_queued(client.send("points.earned", {"fail": True}, id="evt_bad"))
        # The 202 has its row before any worker runs.
        assert _log_rows(app, "evt_bad") == [("queued", None)]
        workers.start()
        _until(lambda: recorder.count("handler_failed") == {"evt_bad": 1}, "the worker to give up")
        _until(lambda: len(_log_rows(app, "evt_bad")) == 3, "the worker's rows")
        error = "RuntimeError: handler broke on purpose on evt_bad"
        (failed, retrying, queued) = delivery_log(app).recent(event_id="evt_bad")
        assert (failed.outcome, failed.reason) == ("failed", error)
        assert retrying.outcome == "retrying"
        assert retrying.reason is not None
        assert re.fullmatch(
            rf"attempt 1 of 2; next at \d\d:\d\d:\d\d UTC: {error}", retrying.reason
        ), retrying.reason
        assert retrying.traceback is not None
        assert retrying.traceback.endswith(f"{error}\n")
        assert retrying.duration is not None
        assert retrying.payload == failed.payload == queued.payload
        assert queued.outcome == "queued"

        # A re-run from the page queues a task, which has its row too, and
        # the worker's processed one follows.
        recorder.fix()
        browser = app.test_client()
        response = browser.post(
            f"/ploints/deliveries/{failed.id}/rerun",
            data={"csrf_token": _csrf_token(browser, failed.id)},
        )
        assert response.status_code == 303
        page = browser.get(response.headers["Location"]).get_data(as_text=True)
        assert "Re-run of evt_bad: queued." in page
        _until(lambda: recorder.count("event_processed") == {"evt_bad": 1}, "the re-run")
        _until(lambda: len(_log_rows(app, "evt_bad")) == 5, "the re-run's rows")
        rows = [outcome for outcome, _ in _log_rows(app, "evt_bad")]
        assert rows[2:] == ["failed", "retrying", "queued"]
        # The worker may write its row before the endpoint's queued one.
        assert sorted(rows[:2]) == ["processed", "queued"]
    finally:
        next(made, None)
        delivery_log(app).engine.dispose()


def test_a_bulk_rerun_queues_each_failed_event_for_the_worker(
    workers: Workers, recorder: Recorder, redis_url: str, unique: str, log_table: dict[str, str]
) -> None:
    workers.config = {"PLOINTS_CELERY_MAX_RETRIES": 0, "TEST_DELIVERY_LOG": log_table}
    made = _make_app(workers.amqp_url, redis_url, unique, **workers.config)
    app, client = next(made)
    ids = ["evt_bulk_1", "evt_bulk_2"]
    try:
        for event_id in ids:
            _assert_queued(client.send("points.earned", {"fail": True}, id=event_id))
        workers.start()
        _until(lambda: recorder.count("handler_failed") == dict.fromkeys(ids, 1), "the failures")
        _until(
            lambda: all(_log_rows(app, event_id)[0][0] == "failed" for event_id in ids),
            "the workers' rows",
        )
        recorder.fix()
        browser = app.test_client()
        page = browser.get("/ploints/deliveries").get_data(as_text=True)
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match is not None, page
        response = browser.post(
            "/ploints/deliveries/rerun",
            data={"csrf_token": match.group(1), "all": "1", "outcome": "failed"},
        )
        assert response.status_code == 303
        page = browser.get(response.headers["Location"]).get_data(as_text=True)
        assert "Re-ran 2 events: 2 queued." in page
        _until(lambda: recorder.count("event_processed") == dict.fromkeys(ids, 1), "the re-runs")
        _until(lambda: all(len(_log_rows(app, event_id)) == 4 for event_id in ids), "their rows")
        for event_id in ids:
            rows = [outcome for outcome, _ in _log_rows(app, event_id)]
            # The worker may write its row before the page's queued one.
            assert (sorted(rows[:2]), rows[2:]) == (["processed", "queued"], ["failed", "queued"])
    finally:
        next(made, None)
        delivery_log(app).engine.dispose()


def test_a_rerun_refused_while_the_worker_holds_the_claim_says_why(
    workers: Workers, redis_url: str, unique: str, log_table: dict[str, str]
) -> None:
    # No worker: the queued task holds its claim for PLOINTS_CELERY_LEASE.
    made = _make_app(workers.amqp_url, redis_url, unique, TEST_DELIVERY_LOG=log_table)
    app, _ = next(made)
    try:
        log = delivery_log(app)
        raw = json.dumps(build_event("points.earned", id="evt_held")).encode()
        failed = log.record(
            "failed", name="ploints", event=parse_event(raw), reason="RuntimeError: earlier"
        )
        browser = app.test_client()
        token = _csrf_token(browser, failed)
        response = browser.post(f"/ploints/deliveries/{failed}/rerun", data={"csrf_token": token})
        page = browser.get(response.headers["Location"]).get_data(as_text=True)
        assert "Re-run of evt_held: queued." in page
        response = browser.post(f"/ploints/deliveries/{failed}/rerun", data={"csrf_token": token})
        page = browser.get(response.headers["Location"]).get_data(as_text=True)
        assert (
            "Re-run of evt_held refused: a Celery worker holds this event&#39;s claim: it is"
            " queued, running, or waiting for its next attempt, and keeps the claim"
            " (PLOINTS_CELERY_LEASE, 3600 s from its last attempt) until the event is processed"
            " or the worker gives up, so that it never runs twice at once. Nothing ran; its"
            " attempts are listed below as they happen. Re-run it once the last one is failed."
        ) in page
        assert [outcome for outcome, _ in _log_rows(app, "evt_held")] == ["queued", "failed"]
    finally:
        next(made, None)
        delivery_log(app).engine.dispose()


# Without a worker or a broker.


def test_importing_the_package_does_not_import_celery() -> None:
    code = (
        "import sys, flask_ploints, flask_ploints._extension, flask_ploints.replay;"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "[]"


def _celery(broker: str = "memory://") -> Celery:
    return Celery("ploints_unit", broker=broker, set_as_current=False)


def test_no_celery_app_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        build_app({"PLOINTS_DISPATCH": "celery"})
    assert str(caught.value) == (
        "PLOINTS_DISPATCH is 'celery' but there is no Celery app: set PLOINTS_CELERY_APP to your"
        ' celery.Celery instance, or put it in app.extensions["celery"] before init_app (as'
        " Flask's celery_init_app does)"
    )


def test_a_celery_app_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"^PLOINTS_CELERY_APP must be a celery.Celery instance"):
        build_app({"PLOINTS_DISPATCH": "celery", "PLOINTS_CELERY_APP": object()})


def test_celery_app_from_extensions_or_option() -> None:
    app = Flask("ploints_test")
    app.testing = True
    app.config["PLOINTS_WEBHOOK_SECRET"] = SECRET
    app.config["PLOINTS_DISPATCH"] = "celery"
    in_extensions = app.extensions["celery"] = _celery()
    PlointsWebhooks(app)
    other = _celery()
    PlointsWebhooks(app, name="partner", url="/partner", celery_app=other, celery_lease=600)

    main = app.extensions["ploints"]["ploints"].dispatcher
    partner = app.extensions["ploints"]["partner"].dispatcher
    assert isinstance(main, CeleryDispatcher)
    assert isinstance(partner, CeleryDispatcher)
    assert main.celery_app is in_extensions
    assert partner.celery_app is other
    assert main.runs_inline is False
    assert main.lease == 3600.0
    assert partner.lease == 600.0

    task = in_extensions.tasks[TASK_NAME]
    assert task is main.task
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert task.ignore_result is True
    assert other.tasks[TASK_NAME] is partner.task is not task


def test_one_task_for_several_instances() -> None:
    app = Flask("ploints_test")
    app.testing = True
    app.config["PLOINTS_WEBHOOK_SECRET"] = SECRET
    celery_app = _celery()
    PlointsWebhooks(app, dispatch="celery", celery_app=celery_app)
    PlointsWebhooks(app, name="partner", url="/partner", dispatch="celery", celery_app=celery_app)
    receivers = app.extensions["ploints"]
    assert receivers["ploints"].dispatcher.task is receivers["partner"].dispatcher.task
    assert [name for name in celery_app.tasks if name.startswith("flask_ploints")] == [TASK_NAME]


_CONFIG_ERRORS = {
    "queue_empty": ({"PLOINTS_CELERY_QUEUE": ""}, "PLOINTS_CELERY_QUEUE must be a non-empty"),
    "lease_zero": ({"PLOINTS_CELERY_LEASE": 0}, "PLOINTS_CELERY_LEASE must be positive"),
    "timeout_text": (
        {"PLOINTS_CELERY_PUBLISH_TIMEOUT": "2s"},
        "PLOINTS_CELERY_PUBLISH_TIMEOUT must be a number of seconds",
    ),
    "timeout_long": (
        {"PLOINTS_CELERY_PUBLISH_TIMEOUT": 8},
        "PLOINTS_CELERY_PUBLISH_TIMEOUT must be at most 5 s",
    ),
    "retries_negative": (
        {"PLOINTS_CELERY_MAX_RETRIES": -1},
        "PLOINTS_CELERY_MAX_RETRIES must be an integer of 0 or more",
    ),
    "retries_bool": ({"PLOINTS_CELERY_MAX_RETRIES": True}, "PLOINTS_CELERY_MAX_RETRIES must be"),
    "backoff_zero": ({"PLOINTS_CELERY_RETRY_BACKOFF": 0}, "PLOINTS_CELERY_RETRY_BACKOFF must be"),
    "lease_short": (
        {"PLOINTS_CELERY_LEASE": 100},
        r"PLOINTS_CELERY_LEASE must exceed the longest wait between retries \(160 s",
    ),
}


@pytest.mark.parametrize(
    ("config", "message"), list(_CONFIG_ERRORS.values()), ids=list(_CONFIG_ERRORS)
)
def test_config_errors(config: dict[str, t.Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        build_app(config)


def test_retry_delays() -> None:
    app, _ = build_app({"PLOINTS_CELERY_RETRY_BACKOFF_MAX": 100})
    settings = app.extensions["ploints"]["ploints"].settings.celery
    assert [settings.retry_delay(n) for n in range(6)] == [10, 20, 40, 80, 100, 100]
    assert settings.retry_delay(10_000) == 100


# replay when the task cannot be queued.


def _fail(app: Flask, event_id: str) -> None:
    """Leave ``event_id`` failed in the store, as a worker that gave up does."""
    body = json.dumps(
        {"id": event_id, "type": "points.earned", "timestamp": "2025-06-15T10:30:00Z", "data": {}}
    )
    store = app.extensions["ploints"]["ploints"].store
    claim = store.claim(event_id, 30, body.encode())
    assert store.fail(event_id, claim.token, "RuntimeError: first failure", 86400)


def test_replay_that_cannot_be_queued_stays_failed(
    redis_url: str, unique: str, unreachable: t.Callable[[str], PlointsClient]
) -> None:
    client = unreachable("amqp://guest:guest@127.0.0.1:1//")
    app = client.client.application
    assert isinstance(app, Flask)
    _fail(app, "evt_1")
    with pytest.raises(DispatchError):
        replay(app, "evt_1")
    stored = _store(app).get("evt_1")
    assert stored is not None
    assert (stored.status, stored.error) == ("failed", "RuntimeError: first failure")


def _inject(app: Flask, args: tuple[t.Any, ...]) -> None:
    """Publish a task the way someone with access to the broker could,
    bypassing the endpoint.
    """
    celery_app = app.extensions["celery"]
    queue = app.config["PLOINTS_CELERY_QUEUE"]
    with celery_app.connection_for_write() as connection:
        celery_app.send_task(TASK_NAME, args=args, queue=queue, connection=connection)


@pytest.mark.parametrize("proof", [None, "0" * 64, "not hex"])
def test_a_task_injected_into_the_broker_runs_nothing(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder, proof: str | None
) -> None:
    app, client = sender
    body = json.dumps(build_event("points.earned", id="evt_forged")).encode()
    args: tuple[t.Any, ...] = ("ploints", body.decode(), "a-guessed-token")
    _inject(app, args if proof is None else (*args, proof))
    # Prefork: a solo worker given the injected task at start-up leaves the
    # next message waiting about 10 s in its event loop (Celery 5.7).
    workers.start(pool="prefork")
    _drain(client, recorder)
    assert recorder.count("starts") == {"evt_drain": 1}
    assert _store(app).get("evt_forged") is None
    # The real event with the same id is still processed when it comes.
    _assert_queued(client.send("points.earned", id="evt_forged"))
    _until(lambda: recorder.count("effects").get("evt_forged") == 1, "the real evt_forged")


def test_a_task_signed_with_another_secret_runs_nothing(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    app, client = sender
    body = json.dumps(build_event("points.earned", id="evt_other")).encode()
    _inject(app, ("ploints", body.decode(), "token", sign(body, "whsec_someone_else")))
    workers.start()
    _drain(client, recorder)
    assert recorder.count("starts") == {"evt_drain": 1}


def test_a_task_without_proof_on_a_real_claim_is_recorded_failed_for_replay(
    workers: Workers, sender: tuple[Flask, PlointsClient], recorder: Recorder
) -> None:
    """A task queued by an older version (no proof) for an event it claimed
    is not run, but recorded failed with its payload, so it can be replayed.
    """
    app, client = sender
    body = json.dumps(build_event("points.earned", id="evt_old")).encode()
    store = _store(app)
    claim = store.claim("evt_old", 3600, body)  # type: ignore[attr-defined]
    _inject(app, ("ploints", body.decode(), claim.token))
    workers.start(pool="prefork")  # see test_a_task_injected_into_the_broker_runs_nothing
    _drain(client, recorder)
    assert "evt_old" not in recorder.count("starts")
    stored = store.get("evt_old")
    assert stored is not None
    assert stored.status == "failed"
    assert stored.error is not None
    assert stored.error.endswith(
        "PlointsError: the task carries no proof that an endpoint verified its body\n"
    )
    assert replay(app, "evt_old") is ReplayOutcome.QUEUED
    _until(lambda: recorder.count("effects").get("evt_old") == 1, "the replayed evt_old")
