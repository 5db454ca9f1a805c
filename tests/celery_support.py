"""What the Celery tests share, whatever the broker: starting and killing
real workers, the endpoint's app in the test process, bounded waits and the
answers they expect. ``tests/test_celery.py`` runs them on RabbitMQ,
``tests/test_celery_redis.py`` on a Redis broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import kombu
from flask import Flask
from werkzeug.test import TestResponse

from flask_ploints.stores import InspectableStore
from flask_ploints.testing import PlointsClient

from .celery_app import Recorder
from .celery_app import create_app

ROOT = Path(__file__).resolve().parent.parent
#: Longest any single wait in these tests may take.
WAIT = 20.0


def until(check: t.Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def delete_queue(amqp_url: str, name: str) -> None:
    """Delete a test's queue and its exchange, both named ``name``, from
    RabbitMQ.
    """
    with kombu.Connection(amqp_url, connect_timeout=2) as connection:
        channel = connection.channel()
        channel.queue_delete(name)
        channel.exchange_delete(name)


class Workers:
    """Starts and stops the Celery workers of one test.

    :param broker_url: the broker.
    :param redis_url: the Redis of the store and the records.
    :param namespace: the queue name and Redis key prefix.
    :param logs: where each worker's output goes.
    :param consuming: tells whether some worker consumes from the queue.
    """

    def __init__(
        self,
        broker_url: str,
        redis_url: str,
        namespace: str,
        logs: Path,
        consuming: t.Callable[[], bool],
    ) -> None:
        self.broker_url = broker_url
        self.redis_url = redis_url
        self.namespace = namespace
        self.logs = logs
        self.consuming = consuming
        #: More config keys of the Flask app, in the workers and the sender.
        self.config: dict[str, t.Any] = {}
        #: More Celery settings of the workers only.
        self.celery: dict[str, t.Any] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        #: The Celery app the workers run, as ``module:attribute``.
        self.app_module = "tests.celery_app:celery"

    def start(self, pool: str = "solo") -> subprocess.Popen[bytes]:
        """Start a worker and wait until it consumes from the queue."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PLOINTS_CELERY_TEST_BROKER": self.broker_url,
            "PLOINTS_CELERY_TEST_REDIS": self.redis_url,
            "PLOINTS_CELERY_TEST_NAMESPACE": self.namespace,
            "PLOINTS_CELERY_TEST_CONFIG": json.dumps(self.config),
            "PLOINTS_CELERY_TEST_CELERY": json.dumps(self.celery),
        }
        number = len(self.processes)
        log = self.logs / f"worker-{number}.log"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app_module,
            "worker",
            f"--pool={pool}",
            "--concurrency=1",
            f"--queues={self.namespace}",
            f"--hostname={self.namespace}-{number}@%h",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
        with log.open("wb") as output:
            # A session of its own: stop() ends the worker's pool children too.
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)

        def consuming() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker exited with {process.returncode}:\n{self.output()}")
            return self.consuming()

        until(consuming, "the worker to consume")
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and wait until it is gone."""
        process.send_signal(signal.SIGKILL)
        process.wait(WAIT)

    def output(self) -> str:
        """Every worker's output, for failure messages."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')}"
            for log in sorted(self.logs.glob("worker-*.log"))
        )

    def stop(self) -> None:
        """Kill every worker this test started, with its pool children.

        SIGKILL rather than a warm shutdown: without heartbeats a worker's
        event loop only notices SIGTERM after some 10 s, and every test
        removes its queue anyway.
        """
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(WAIT)


def make_app(
    broker_url: str, redis_url: str, namespace: str, **config: t.Any
) -> t.Iterator[tuple[Flask, PlointsClient]]:
    """Yield the endpoint's app in this process and its client; then close
    its broker connections and its store.
    """
    app = create_app(broker_url, redis_url, namespace, config)
    yield app, PlointsClient(app)
    receiver = app.extensions["ploints"]["ploints"]
    receiver.dispatcher.close()
    client = getattr(receiver.store, "client", None)
    if client is not None:
        client.close()
    engine = getattr(receiver.store, "engine", None)
    if engine is not None:
        engine.dispose()


def store_of(app: Flask) -> InspectableStore:
    """The dedupe store of the app's instance."""
    store = app.extensions["ploints"]["ploints"].store
    assert isinstance(store, InspectableStore)
    return store


def assert_queued(response: TestResponse) -> None:
    assert response.status_code == 202
    assert response.get_json() == {"received": True, "queued": True}


def assert_duplicate(response: TestResponse) -> None:
    assert response.status_code == 200
    assert response.get_json() == {"received": True, "duplicate": True}


def assert_in_flight(response: TestResponse) -> None:
    assert response.status_code == 409
    assert response.get_json() == {"error": "event is being processed"}
    assert 3000 < int(response.headers["Retry-After"]) <= 3600


def drain(client: PlointsClient, recorder: Recorder) -> None:
    """Queue one more event, ``evt_drain``, and wait until a worker processed
    it. A worker of concurrency 1 (solo, or prefork with one child) takes
    them in the order they were queued, so whatever was queued before has
    run by then.
    """
    assert_queued(client.send("customer.created", id="evt_drain"))
    until(
        lambda: recorder.count("event_processed").get("evt_drain") == 1,
        "the worker to process evt_drain",
    )
