"""Many simultaneous deliveries of one event to a threaded server over real
sockets: the handler runs exactly once.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import typing as t
from collections import Counter

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer
from werkzeug.serving import make_server

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints._signature import sign
from flask_ploints.testing import build_event

from .support import SECRET


@pytest.fixture
def server(app: Flask) -> t.Iterator[BaseWSGIServer]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)


def _post(port: int, body: bytes) -> tuple[int, dict[str, t.Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            "/webhooks/ploints",
            body,
            {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, SECRET)},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_fifty_threads_one_id_one_run(webhooks: PlointsWebhooks, server: BaseWSGIServer) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    @webhooks.on("points.earned")
    def award(event: Event) -> None:
        with lock:
            runs.append(event.id)
        time.sleep(0.3)

    body = json.dumps(build_event("points.earned", id="evt_race")).encode()
    barrier = threading.Barrier(50)
    answers: list[tuple[int, dict[str, t.Any]]] = []

    def deliver() -> None:
        barrier.wait()
        answer = _post(server.port, body)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=deliver) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert runs == ["evt_race"]
    assert len(answers) == 50
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 409}
    processed = [body for status, body in answers if body == {"received": True}]
    assert len(processed) == 1
    assert statuses[409] + statuses[200] == 50
    # Every other 200 is a duplicate answered after the first finished.
    assert all(
        body == {"received": True, "duplicate": True}
        for status, body in answers
        if status == 200 and body != {"received": True}
    )


def test_distinct_ids_in_parallel_all_run_once(
    webhooks: PlointsWebhooks, server: BaseWSGIServer
) -> None:
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    @webhooks.on_any
    def record(event: Event) -> None:
        with lock:
            runs[event.id] += 1

    bodies = [
        json.dumps(build_event("points.earned", id=f"evt_{n % 10}")).encode() for n in range(60)
    ]
    threads = [threading.Thread(target=_post, args=(server.port, body)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Every id was processed once; copies were skipped or told to retry.
    assert runs == Counter({f"evt_{n}": 1 for n in range(10)})
