"""Exactly-once processing under faults, against real gunicorn servers.

Each test starts ``gunicorn`` (sync workers, or gthread) on free loopback ports with
:mod:`tests.gunicorn_app`, whose handler records every time it processes an
event in a place all worker processes share: the real Redis for the Redis
store, a table in the real PostgreSQL for the SQL store. Every test runs with
each store, uses its own key prefix and tables (the ``unique`` fixture) and
removes them, its servers and its helpers afterwards. Every wait is bounded.

What the tests show, for each store:

* ``test_burst_on_four_workers``: 1,000 deliveries (40 ids x 25 copies,
  shuffled) fired 64 at a time at 4 workers sharing the store are answered
  only ``200`` or ``409``, and each id is processed exactly once.
* ``test_burst_on_threaded_workers``: 600 deliveries (200 ids x 3 copies)
  fired 64 at a time at gunicorn ``gthread`` (2 workers x 32 threads, more
  threads than the SQL store's pool of 5 + 10) are answered only ``200`` or
  ``409``, none slower than 5 s, and each id is processed exactly once.
* ``test_two_servers_share_the_store``: the same with the deliveries spread
  over two servers on two ports (two hosts in miniature).
* ``test_worker_killed_mid_handler``: a worker SIGKILLed inside a handler
  leaves a claim that holds (``409``) until ``PLOINTS_CLAIM_LEASE`` (10 s)
  runs out; the next retry then processes the event, exactly once.
* ``test_store_outage``: while the store is down every delivery is answered
  ``503`` within 3 s and nothing runs; once it is back the retries process
  every event exactly once.

How the outage is made: for Redis, a private ``redis-server`` on a free port
(no persistence) is stopped with SIGTERM and started again on the same port.
For PostgreSQL, a TCP proxy thread in the test stands between gunicorn and
the real server: stopping it closes its listening socket and every open
connection, so pooled connections break and new ones are refused, as when a
database host goes away; starting it listens on the same port again. The
proxy was chosen over a throwaway cluster because it needs no ``initdb`` (a
non-root user, seconds per start) and keeps the data, so the test checks the
receiver rather than the database's recovery.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from flask_ploints._samples import build_event
from flask_ploints._signature import sign

from .gunicorn_app import SECRET
from .gunicorn_app import PostgresRecorder
from .gunicorn_app import RedisRecorder
from .support import missing

ROOT = Path(__file__).resolve().parent.parent
URL_PATH = "/webhooks/ploints"
#: Longest any single wait in these tests may take.
WAIT = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {WAIT} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Gunicorn:
    """One gunicorn server running :mod:`tests.gunicorn_app`, or ``app``.

    :param env: the ``PLOINTS_FAULTS_*`` variables (or ``app``'s).
    :param workers: how many worker processes.
    :param log: where gunicorn's output goes.
    :param app: the WSGI app to serve, as gunicorn takes it.
    :param options: more command-line options.
    """

    def __init__(
        self,
        env: dict[str, str],
        workers: int,
        log: Path,
        threads: int = 1,
        app: str = "tests.gunicorn_app:create_app()",
        options: t.Sequence[str] = (),
    ) -> None:
        self.port = _free_port()
        self.log_path = log
        self._log = log.open("wb")
        # Each server its own control socket directory: gunicorn's default,
        # ~/.gunicorn, is one path for every server on the machine.
        runtime = log.parent / f"runtime-{self.port}"
        runtime.mkdir()
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            *(["--worker-class", "gthread", "--threads", str(threads)] if threads > 1 else []),
            "--bind",
            f"127.0.0.1:{self.port}",
            # A worker sleeping in a handler must be killed by the test, not
            # by gunicorn's own timeout.
            "--timeout",
            "120",
            "--graceful-timeout",
            "3",
            *options,
            app,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_port(self.port, self.process, "gunicorn")
            self._wait_for_app()
        except BaseException:
            self.stop()
            raise

    def _wait_for_app(self) -> None:
        # Listening is the master; a GET answered 405 is a worker with the app.
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    connection.request("GET", URL_PATH)
                    if connection.getresponse().status == 405:
                        return
                finally:
                    connection.close()
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn on port {self.port} did not answer within {WAIT} s")

    def stop(self) -> None:
        """Stop the server and its workers."""
        _stop(self.process)
        self._log.close()

    def output(self) -> str:
        """The server's log so far, for failure messages."""
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Answer:
    """One delivery's outcome: its status (``0`` when the connection failed)
    and how long it took.
    """

    status: int
    seconds: float
    body: bytes = b""
    retry_after: str | None = None


def deliver(port: int, body: bytes, timeout: float = WAIT) -> Answer:
    """Post one signed delivery, as the sender does, on a fresh connection."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "POST",
            URL_PATH,
            body=body,
            headers={"Content-Type": "application/json", "X-Ploints-Signature": sign(body, SECRET)},
        )
        response = connection.getresponse()
        content = response.read()
        return Answer(
            response.status,
            time.monotonic() - started,
            content,
            response.getheader("Retry-After"),
        )
    except (OSError, http.client.HTTPException):
        return Answer(0, time.monotonic() - started)
    finally:
        connection.close()


def fire(ports: list[int], bodies: list[bytes], concurrency: int = 64) -> list[Answer]:
    """Post every body, ``concurrency`` at a time, spread over ``ports`` in
    turn; return the answers in the order of ``bodies``.
    """
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [
            pool.submit(deliver, ports[number % len(ports)], body)
            for number, body in enumerate(bodies)
        ]
        return [future.result(timeout=WAIT * 3) for future in futures]


def event_body(event_id: str, **data: t.Any) -> bytes:
    """The exact bytes of one event; every copy of a delivery is the same."""
    return json.dumps(build_event("points.earned", {"amount": 5, **data}, id=event_id)).encode()


def copies(prefix: str, ids: int, each: int, seed: int = 7) -> tuple[list[str], list[bytes]]:
    """``ids`` events, ``each`` copies of each, shuffled."""
    names = [f"{prefix}_{number:03d}" for number in range(ids)]
    bodies = [body for name in names for body in [event_body(name)] * each]
    random.Random(seed).shuffle(bodies)
    return names, bodies


class Proxy:
    """A TCP forwarder from a loopback port to ``target``, in threads of this
    process, that can be stopped (listener and every connection closed) and
    started again on the same port.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = _free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Listen on :attr:`port` and forward every connection."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every forwarded connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                sock.setblocking(True)
                sock.settimeout(None)
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select(timeout=1.0):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        peers[key.fileobj].sendall(data)  # type: ignore[index]
                    with self._lock:
                        if client not in self._sockets:
                            return
            except (OSError, ValueError):
                return
            finally:
                for sock in peers:
                    with contextlib.suppress(OSError):
                        sock.close()
                with self._lock:
                    self._sockets.difference_update(peers)


class RedisServer:
    """A private ``redis-server`` without persistence, on a free port, that
    can be stopped and started again on the same port.
    """

    def __init__(self, log: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            missing("redis-server is not installed")
        self.binary = binary
        self.port = _free_port()
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The server's URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it listens."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for_port(self.port, self.process, "redis-server")

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait until it has exited."""
        if self.process is not None:
            _stop(self.process)


@dataclass
class Backend:
    """One store under test: its URL for the servers, and where effects go."""

    name: str
    store_url: str
    effects_url: str
    namespace: str
    recorder: RedisRecorder | PostgresRecorder

    def env(self, store_url: str | None = None, lease: float = 30.0) -> dict[str, str]:
        """The environment of a gunicorn server on this backend."""
        return {
            "PLOINTS_FAULTS_STORE": store_url or self.store_url,
            "PLOINTS_FAULTS_NAMESPACE": self.namespace,
            "PLOINTS_FAULTS_EFFECTS": self.effects_url,
            "PLOINTS_FAULTS_LEASE": str(lease),
        }


@pytest.fixture(params=["redis", "postgresql"])
def backend(request: pytest.FixtureRequest, unique: str) -> t.Iterator[Backend]:
    """Each test once with the Redis store and once with the SQL store, each
    recording effects in its own service; removes keys and tables after.
    """
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        redis_recorder = RedisRecorder(url, unique)
        yield Backend("redis", url, url, unique, redis_recorder)
        keys = list(redis_recorder.client.scan_iter(match=f"{unique}:*", count=1000))
        if keys:
            redis_recorder.client.delete(*keys)
        redis_recorder.client.close()
    else:
        url = request.getfixturevalue("postgres_url")
        pg_recorder = PostgresRecorder(url, unique)
        pg_recorder.create()
        try:
            yield Backend("postgresql", url, url, unique, pg_recorder)
        finally:
            pg_recorder.drop()
            pg_recorder._execute(f"DROP TABLE IF EXISTS {unique}_store")
            pg_recorder.close()


@pytest.fixture
def servers(tmp_path: Path) -> t.Iterator[t.Callable[..., Gunicorn]]:
    """Start gunicorn servers; every one is stopped after the test, and its
    log printed if the test failed.
    """
    started: list[Gunicorn] = []

    def start(env: dict[str, str], workers: int = 4, threads: int = 1) -> Gunicorn:
        server = Gunicorn(env, workers, tmp_path / f"gunicorn-{len(started)}.log", threads)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        print(f"--- gunicorn on {server.port} ---\n{server.output()}")


def _statuses(answers: list[Answer]) -> Counter[int]:
    return Counter(answer.status for answer in answers)


def _settle(port: int, names: list[str]) -> None:
    """One more retry of every id, one at a time: each must be a duplicate."""
    for name in names:
        answer = deliver(port, event_body(name))
        assert answer.status == 200, (name, answer)
        assert json.loads(answer.body) == {"received": True, "duplicate": True}, (name, answer)


def test_burst_on_four_workers(backend: Backend, servers: t.Callable[..., Gunicorn]) -> None:
    server = servers(backend.env())
    names, bodies = copies("evt_burst", ids=40, each=25)
    answers = fire([server.port], bodies, concurrency=64)
    statuses = _statuses(answers)
    assert set(statuses) <= {200, 409}, statuses
    assert all(a.retry_after for a in answers if a.status == 409)
    assert backend.recorder.effects() == dict.fromkeys(names, 1)
    _settle(server.port, names)
    assert backend.recorder.effects() == dict.fromkeys(names, 1)


def test_burst_on_threaded_workers(backend: Backend, servers: t.Callable[..., Gunicorn]) -> None:
    # gthread, 2 workers x 32 threads: more threads in one process than the
    # SQL store's pool (5 + 10) holds connections.
    server = servers(backend.env(), workers=2, threads=32)
    names, bodies = copies("evt_threads", ids=200, each=3, seed=5)
    started = time.monotonic()
    answers = fire([server.port], bodies, concurrency=64)
    statuses = _statuses(answers)
    assert set(statuses) <= {200, 409}, statuses
    assert all(a.retry_after for a in answers if a.status == 409)
    assert backend.recorder.effects() == dict.fromkeys(names, 1)
    # No answer came near the sender's 10 s timeout.
    assert time.monotonic() - started < WAIT
    assert max(answer.seconds for answer in answers) < 5.0
    _settle(server.port, names)
    assert backend.recorder.effects() == dict.fromkeys(names, 1)


def test_two_servers_share_the_store(backend: Backend, servers: t.Callable[..., Gunicorn]) -> None:
    first = servers(backend.env(), workers=2)
    second = servers(backend.env(), workers=2)
    names, bodies = copies("evt_hosts", ids=40, each=25, seed=11)
    answers = fire([first.port, second.port], bodies, concurrency=64)
    statuses = _statuses(answers)
    assert set(statuses) <= {200, 409}, statuses
    # Both hosts processed events, so the dedupe really was shared.
    pids = set(backend.recorder.pids().values())
    assert len(pids) >= 2
    assert backend.recorder.effects() == dict.fromkeys(names, 1)
    _settle(second.port, names)
    assert backend.recorder.effects() == dict.fromkeys(names, 1)


def test_worker_killed_mid_handler(backend: Backend, servers: t.Callable[..., Gunicorn]) -> None:
    lease = 10.0  # the least PLOINTS_CLAIM_LEASE allows: the sender's timeout
    server = servers(backend.env(lease=lease))
    body = event_body("evt_killed", hang=60)
    first: list[Answer] = []
    sender = threading.Thread(target=lambda: first.append(deliver(server.port, body)))
    sender.start()

    deadline = time.monotonic() + WAIT
    while "evt_killed" not in backend.recorder.pids():
        assert time.monotonic() < deadline, "the handler never started"
        time.sleep(0.02)
    pid = backend.recorder.pids()["evt_killed"]
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    sender.join(timeout=WAIT)
    assert not sender.is_alive()
    assert first[0].status == 0, first  # the connection died with the worker
    assert backend.recorder.effects() == {}

    # The dead worker's claim holds until its lease runs out...
    held = deliver(server.port, body)
    if time.monotonic() - killed_at < lease - 0.5:
        assert held.status == 409, held
        assert held.retry_after is not None
    # ...then the next retry processes the event.
    deadline = time.monotonic() + WAIT
    retries: list[Answer] = []
    while True:
        answer = deliver(server.port, body)
        retries.append(answer)
        if answer.status == 200:
            break
        assert answer.status == 409, retries
        assert time.monotonic() < deadline, retries
        time.sleep(0.25)
    assert json.loads(retries[-1].body) == {"received": True}
    assert time.monotonic() - killed_at >= lease - 0.5
    assert backend.recorder.effects() == {"evt_killed": 1}
    # Later retries are duplicates; other events still flow.
    _settle(server.port, ["evt_killed"])
    assert deliver(server.port, event_body("evt_after")).status == 200
    assert backend.recorder.effects() == {"evt_killed": 1, "evt_after": 1}


@pytest.fixture
def outage(backend: Backend, tmp_path: Path) -> t.Iterator[tuple[str, RedisServer | Proxy]]:
    """A store that the test can stop and start: a private redis-server, or a
    proxy to the real PostgreSQL. Yields the URL the servers use, and it.
    """
    if backend.name == "redis":
        redis_server = RedisServer(tmp_path / "redis-server.log")
        try:
            yield redis_server.url, redis_server
        finally:
            redis_server.stop()
    else:
        from sqlalchemy.engine import make_url

        url = make_url(backend.store_url)
        proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
        try:
            yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy
        finally:
            proxy.stop()


def test_store_outage(
    backend: Backend,
    servers: t.Callable[..., Gunicorn],
    outage: tuple[str, RedisServer | Proxy],
) -> None:
    store_url, store = outage
    server = servers(backend.env(store_url=store_url))
    # Before: the workers reach the store and keep connections to it.
    before = fire([server.port], [event_body(f"evt_before_{n}") for n in range(8)], 8)
    assert _statuses(before) == {200: 8}

    store.stop()
    names, bodies = copies("evt_outage", ids=40, each=2, seed=3)
    during = fire([server.port], bodies, concurrency=16)
    assert _statuses(during) == {503: len(bodies)}, _statuses(during)
    assert max(answer.seconds for answer in during) < 3.0
    assert all(answer.retry_after for answer in during)
    assert not set(backend.recorder.effects()) & set(names)

    store.start()
    after = fire([server.port], bodies, concurrency=16)
    assert set(_statuses(after)) <= {200, 409}, _statuses(after)
    effects = backend.recorder.effects()
    # A 409 means another copy held the claim; a retry of every id settles.
    for name in names:
        if name not in effects:
            assert deliver(server.port, event_body(name)).status == 200
    expected = dict.fromkeys(names, 1) | {f"evt_before_{n}": 1 for n in range(8)}
    assert backend.recorder.effects() == expected
    if backend.name == "postgresql":
        # The proxied database kept its state through the outage.
        _settle(server.port, [*names, "evt_before_0"])
    else:
        # The private Redis keeps nothing over a restart (no persistence),
        # so only the retried events are known to it again.
        _settle(server.port, names)
    assert backend.recorder.effects() == expected
