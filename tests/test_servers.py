"""The endpoint under every WSGI server it is likely to meet.

Every server runs :mod:`tests.server_app` in a subprocess on a free loopback
port; the handler appends each id it processes to a Redis list, so effects
are counted across processes and threads. Each test uses its own key prefix
(the ``unique`` fixture), removes it after, and stops every process it
started (the whole process group, so no worker outlives its test).

What the tests show:

* ``test_exactly_once``, once per server: gunicorn sync, gthread (2 workers
  x 32 threads) and gevent workers, waitress, uWSGI (``pyuwsgi``, master,
  2 processes x 4 threads) and werkzeug's threaded server. 40 ids x 3
  identical copies, shuffled, posted by 24 client threads, are answered
  ``200`` (processed or duplicate) or ``409`` only, each ``409`` while the
  copy that processed the id was in flight; retrying the ``409``\\ s ends in
  ``200``; every id is processed exactly once, no answer takes 5 s; a
  forged delivery is a JSON ``401`` and runs nothing.
* ``test_chunked_delivery``, once per server: a signed body sent with
  ``Transfer-Encoding: chunked`` is processed, then a duplicate; under uWSGI,
  which does not pass it on, it is answered ``411``.
* ``test_exactly_once_postgresql``: the same under gthread with the SQL
  store on the real PostgreSQL (``postgresql://`` URL, its own table), as
  the extension builds it from the URL (a pool of 5 + 10).
* ``test_postgresql_url_store_under_many_threads``: with that store, 64
  deliveries at once to gthread (32 threads a worker, more than the pool)
  are all answered ``200``, none slower than 5 s.
* The production shape (``proxied`` fixture): nginx terminating TLS with a
  certificate made by ``openssl`` at test time, in front of gunicorn
  (gthread), the app with ``PLOINTS_REQUIRE_HTTPS`` and ``ProxyFix``.
  Gunicorn is told to trust no proxy (``--forwarded-allow-ips``), so the
  ``X-Forwarded-Proto`` header reaches the app only through ``ProxyFix``.
  Deliveries through nginx over HTTPS are ``200``; the same request
  straight to gunicorn over plain HTTP is ``403``; curl (``--data-binary
  @file``, chunked, ``Expect: 100-continue``) and Node's ``fetch`` signing
  with ``node:crypto`` as the sender's example does get ``200`` through
  nginx, a Node request with a wrong signature ``401``; curl's chunked body
  straight to gunicorn goes through the endpoint's chunked path.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import importlib.util
import json
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import typing as t
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest

from flask_ploints._samples import build_event
from flask_ploints._signature import sign

from .server_app import SECRET
from .server_app import effects_key
from .support import POSTGRES_URL
from .support import REDIS_URL
from .support import missing
from .support import require_service

ROOT = Path(__file__).resolve().parent.parent
URL_PATH = "/webhooks/ploints"
#: The sender's own timeout, the bound on every request here.
CLIENT_TIMEOUT = 10.0
#: The slowest answer any test accepts.
SLOWEST = 5.0
#: Longest wait for a server to start.
START_WAIT = 20.0

PROCESSED = {"received": True}
DUPLICATE = {"received": True, "duplicate": True}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- servers ---------------------------------------------------------------


class Server:
    """A server in its own process group, started from ``command``; ready
    once ``ready()`` is true, stopped with SIGTERM, then SIGKILL for the
    whole group.

    :param name: what the server is, for messages.
    :param command: the command line.
    :param env: variables added to this process's environment.
    :param log: where its output goes.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("wb")
        # Recent gunicorn (27 here) makes a control socket in XDG_RUNTIME_DIR or
        # ~/.gunicorn; one path shared by every server would be taken over by
        # the last one started.
        runtime = log.with_suffix(".run")
        runtime.mkdir(mode=0o700)
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            # The worktree's package and tests, whatever the venv has installed.
            env={**os.environ, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until(self, ready: t.Callable[[], bool]) -> None:
        """Poll ``ready`` until it is true; fail if the server exits or
        ``START_WAIT`` passes.
        """
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.output()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if ready():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} was not ready within {START_WAIT} s:\n{self.output()}")

    def stop(self) -> None:
        """Stop the server and everything it started."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # Workers of a master that died first would be left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()

    def output(self) -> str:
        """The end of the server's log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-4000:]


def _connection(
    port: int, timeout: float, context: ssl.SSLContext | None
) -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)


def _answers_get(port: int, status: int = 405, context: ssl.SSLContext | None = None) -> bool:
    """Whether a GET of the endpoint is answered ``status``: the app is
    loaded in a worker, not only the port open.
    """
    connection = _connection(port, 2.0, context)
    try:
        connection.request("GET", URL_PATH)
        return connection.getresponse().status == status
    finally:
        connection.close()


def _python_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        missing(f"the Python package {name!r} is not installed (extra 'test')")


def _gunicorn(port: int, *options: str) -> list[str]:
    _python_module("gunicorn")
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--graceful-timeout",
        "2",
        *options,
        "tests.server_app:create_app()",
    ]


def _uwsgi(port: int) -> list[str]:
    _python_module("pyuwsgi")
    binary = Path(sys.executable).with_name("uwsgi")
    if not binary.exists():
        missing(f"{binary} (from the package pyuwsgi) does not exist")
    return [
        str(binary),
        "--http-socket",
        f"127.0.0.1:{port}",
        "--master",
        "--processes",
        "2",
        "--threads",
        "4",
        # Fail at start when the app does not import, rather than answer 500.
        "--need-app",
        # SIGTERM stops uWSGI 2.0 (without it, SIGTERM reloads).
        "--die-on-term",
        "--chdir",
        str(ROOT),
        "--module",
        "tests.server_wsgi:application",
    ]


def _waitress(port: int) -> list[str]:
    _python_module("waitress")
    return [
        sys.executable,
        "-m",
        "waitress",
        f"--listen=127.0.0.1:{port}",
        "--threads=8",
        "--call",
        "tests.server_app:create_app",
    ]


def _werkzeug(port: int) -> list[str]:
    return [sys.executable, "-m", "tests.server_app", str(port)]


def _gevent(port: int) -> list[str]:
    _python_module("gevent")
    return _gunicorn(port, "--worker-class", "gevent", "--worker-connections", "100")


#: Each server's command line for a port.
COMMANDS: dict[str, t.Callable[[int], list[str]]] = {
    "gunicorn-sync": lambda port: _gunicorn(port, "--worker-class", "sync"),
    "gunicorn-gthread": lambda port: _gunicorn(
        port, "--worker-class", "gthread", "--threads", "32"
    ),
    "gunicorn-gevent": _gevent,
    "waitress": _waitress,
    "uwsgi": _uwsgi,
    "werkzeug": _werkzeug,
}


@pytest.fixture
def serve(tmp_path: Path) -> t.Iterator[t.Callable[..., Server]]:
    """Start servers; each is stopped after the test, its log printed."""
    started: list[Server] = []

    def start(
        name: str, command: list[str], env: dict[str, str], ready: t.Callable[[], bool]
    ) -> Server:
        server = Server(name, command, env, tmp_path / f"{name}-{len(started)}.log")
        started.append(server)
        server.wait_until(ready)
        return server

    yield start
    for server in started:
        server.stop()
        print(f"--- {server.name} ---\n{server.output()}")


@dataclass
class Namespace:
    """One test's names in Redis (and its SQL table), and its effects."""

    name: str
    client: t.Any

    def env(self, store: str = REDIS_URL) -> dict[str, str]:
        """The app's environment."""
        return {
            "PLOINTS_SERVERS_STORE": store,
            "PLOINTS_SERVERS_NAMESPACE": self.name,
            "PLOINTS_SERVERS_EFFECTS": REDIS_URL,
        }

    def effects(self) -> Counter[str]:
        """How many times each event id was processed."""
        return Counter(item.decode() for item in self.client.lrange(effects_key(self.name), 0, -1))


def _namespace(name: str) -> t.Iterator[Namespace]:
    import redis

    require_service("Redis", "127.0.0.1", 6379)
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        yield Namespace(name, client)
    finally:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def namespace(unique: str) -> t.Iterator[Namespace]:
    """This test's Redis names; removed after."""
    yield from _namespace(unique)


# --- the sender ------------------------------------------------------------


@dataclass
class Answer:
    """One delivery: its id, status, body, ``Retry-After`` and when it was
    sent and answered (monotonic). Status ``0``: no answer.
    """

    event_id: str
    status: int
    body: bytes
    content_type: str | None
    retry_after: str | None
    started: float
    ended: float

    @property
    def seconds(self) -> float:
        """How long the answer took."""
        return self.ended - self.started

    def json(self) -> t.Any:
        """The body, parsed."""
        return json.loads(self.body)


def event_body(event_id: str, **data: t.Any) -> bytes:
    """The exact bytes of one event; every copy of a delivery is the same."""
    return json.dumps(build_event("points.earned", {"amount": 5, **data}, id=event_id)).encode()


def post(
    port: int,
    event_id: str,
    body: bytes,
    signature: str | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    chunked: bool = False,
) -> Answer:
    """Post one delivery on a fresh connection, as the sender does: signed,
    bounded by its 10 s timeout; over HTTPS when given a ``context``; in two
    chunks (``Transfer-Encoding: chunked``) when ``chunked``.
    """
    started = time.monotonic()
    connection = _connection(port, CLIENT_TIMEOUT, context)
    try:
        # The server may answer before the whole body is sent (a 411 or a
        # 413) and stop reading; its answer is there to read all the same.
        with contextlib.suppress(BrokenPipeError):
            connection.request(
                "POST",
                URL_PATH,
                body=iter([body[:20], body[20:]]) if chunked else body,
                encode_chunked=chunked,
                headers={
                    "Content-Type": "application/json",
                    "X-Ploints-Signature": signature or sign(body, SECRET),
                    **(headers or {}),
                },
            )
        response = connection.getresponse()
        content = response.read()
        return Answer(
            event_id,
            response.status,
            content,
            response.getheader("Content-Type"),
            response.getheader("Retry-After"),
            started,
            time.monotonic(),
        )
    except (OSError, http.client.HTTPException) as exc:
        return Answer(event_id, 0, repr(exc).encode(), None, None, started, time.monotonic())
    finally:
        connection.close()


def burst(port: int, names: list[str], copies: int = 3, threads: int = 24) -> list[Answer]:
    """``copies`` identical deliveries of each id, shuffled, ``threads`` at
    a time; the handler holds each event 50 ms so that copies overlap.
    """
    bodies = {name: event_body(name, hold=0.05) for name in names}
    order = [name for name in names for _ in range(copies)]
    random.Random(len(names)).shuffle(order)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(post, port, name, bodies[name]) for name in order]
        return [future.result(timeout=CLIENT_TIMEOUT * 2) for future in futures]


def check_exactly_once(port: int, names: list[str], namespace: Namespace, copies: int = 3) -> None:
    """Post a burst, retry every ``409`` until ``200``; assert what the
    sender sees and what the handler did.
    """
    answers = burst(port, names, copies)
    statuses = Counter(answer.status for answer in answers)
    print(f"{len(answers)} deliveries to port {port}: {dict(statuses)}")
    assert set(statuses) <= {200, 409}, (
        statuses,
        [a for a in answers if a.status not in (200, 409)],
    )
    assert max(answer.seconds for answer in answers) < SLOWEST

    processed = {a.event_id: a for a in answers if a.status == 200 and a.json() == PROCESSED}
    others = [a for a in answers if a.event_id not in processed or a is not processed[a.event_id]]
    for answer in others:
        if answer.status == 200:
            assert answer.json() == DUPLICATE, answer
        else:
            assert answer.json() == {"error": "event is being processed"}, answer
            assert answer.content_type == "application/json"
            assert answer.retry_after is not None and int(answer.retry_after) >= 1
            # A 409 only while the copy that processed the id was in flight.
            winner = processed.get(answer.event_id)
            assert winner is not None, (answer, "no copy of this id was processed")
            assert winner.started < answer.ended and answer.started < winner.ended, (answer, winner)
    assert sorted(processed) == sorted(names)

    # The sender retries every 409 (here without its minutes of waiting).
    for answer in answers:
        if answer.status != 409:
            continue
        body = event_body(answer.event_id, hold=0.05)
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while True:
            retry = post(port, answer.event_id, body)
            if retry.status == 200:
                break
            assert retry.status == 409, retry
            assert time.monotonic() < deadline, retry
            time.sleep(0.05)
        assert retry.json() == DUPLICATE, retry
        assert retry.seconds < SLOWEST

    assert namespace.effects() == Counter(dict.fromkeys(names, 1))

    forged = event_body("evt_forged")
    answer = post(port, "evt_forged", forged, signature=sign(forged, "whsec_not_the_secret"))
    assert (answer.status, answer.content_type) == (401, "application/json"), answer
    assert answer.json() == {"error": "invalid signature"}
    assert namespace.effects() == Counter(dict.fromkeys(names, 1))


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_exactly_once(kind: str, namespace: Namespace, serve: t.Callable[..., Server]) -> None:
    port = _free_port()
    server = serve(kind, COMMANDS[kind](port), namespace.env(), lambda: _answers_get(port))
    check_exactly_once(port, [f"evt_{n:02d}" for n in range(40)], namespace)
    assert server.process.poll() is None, server.output()


@pytest.mark.parametrize("kind", [kind for kind in COMMANDS if kind != "uwsgi"])
def test_chunked_delivery(kind: str, namespace: Namespace, serve: t.Callable[..., Server]) -> None:
    port = _free_port()
    serve(kind, COMMANDS[kind](port), namespace.env(), lambda: _answers_get(port))
    body = event_body("evt_chunked")
    first = post(port, "evt_chunked", body, chunked=True)
    assert (first.status, first.body) == (200, b'{"received": true}\n'), first
    again = post(port, "evt_chunked", body, chunked=True)
    assert (again.status, again.json()) == (200, DUPLICATE), again
    assert namespace.effects() == {"evt_chunked": 1}


def test_chunked_delivery_under_uwsgi_is_a_411(
    namespace: Namespace, serve: t.Callable[..., Server]
) -> None:
    """uWSGI's ``--http-socket`` passes a chunked body on neither with a
    ``Content-Length`` nor as ``wsgi.input_terminated``, so the app reads it
    as empty: the answer says so, rather than blame the signature.
    """
    port = _free_port()
    serve("uwsgi", COMMANDS["uwsgi"](port), namespace.env(), lambda: _answers_get(port))
    body = event_body("evt_chunked")
    answer = post(port, "evt_chunked", body, chunked=True)
    assert (answer.status, answer.json()) == (
        411,
        {"error": "the server passed on no chunked body: send a Content-Length"},
    ), answer
    assert post(port, "evt_chunked", body).status == 200
    assert namespace.effects() == {"evt_chunked": 1}


@pytest.fixture
def postgres_store(unique: str) -> t.Iterator[str]:
    """A ``postgresql://`` URL without a driver (the store must pick
    psycopg 3 itself); the store's table is dropped after the servers stop.
    """
    import psycopg

    require_service("PostgreSQL", "127.0.0.1", 5432)
    store = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    yield store
    with psycopg.connect(store, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {unique}_store")


def test_exactly_once_postgresql(
    namespace: Namespace, postgres_store: str, serve: t.Callable[..., Server], unique: str
) -> None:
    import psycopg

    port = _free_port()
    serve(
        "gunicorn-gthread-postgresql",
        COMMANDS["gunicorn-gthread"](port),
        namespace.env(postgres_store),
        lambda: _answers_get(port),
    )
    check_exactly_once(port, [f"evt_{n:02d}" for n in range(40)], namespace)
    with psycopg.connect(postgres_store, autocommit=True, connect_timeout=5) as connection:
        rows = connection.execute(f"SELECT count(*) FROM {unique}_store").fetchone()
    assert rows == (40,)


def test_postgresql_url_store_under_many_threads(
    namespace: Namespace, postgres_store: str, serve: t.Callable[..., Server]
) -> None:
    port = _free_port()
    serve(
        "gunicorn-gthread-postgresql-url",
        COMMANDS["gunicorn-gthread"](port),
        namespace.env(postgres_store),
        lambda: _answers_get(port),
    )
    # 64 distinct events at once: about 32 concurrent claims per worker.
    names = [f"evt_{n:02d}" for n in range(64)]
    answers = burst(port, names, copies=1, threads=64)
    slowest = max(answers, key=lambda answer: answer.seconds)
    assert Counter(answer.status for answer in answers) == {200: 64}, slowest
    assert slowest.seconds < SLOWEST, slowest


@pytest.mark.parametrize("store", ["redis", "postgresql", "db-postgresql"])
def test_latest_by_under_gunicorn_gthread(
    namespace: Namespace,
    serve: t.Callable[..., Server],
    request: pytest.FixtureRequest,
    store: str,
    unique: str,
) -> None:
    """24 tier changes for one customer from 8 concurrent senders, each
    retrying its ``409`` answers, on two gthread workers sharing the store:
    the ``latest_by`` handler applies a strictly increasing sequence that
    ends with the newest. On PostgreSQL (by URL, and ``db``, where the
    turn is the key's row locked in the handlers' transaction) a burst of
    64 deliveries comes first, so the store keeps all its connections when
    the order's table is first used.
    """
    port = _free_port()
    url = REDIS_URL if store == "redis" else request.getfixturevalue("postgres_store")
    if store == "db-postgresql":
        url = f"db:{POSTGRES_URL}"
    serve(
        f"gunicorn-gthread-latest-by-{store}",
        COMMANDS["gunicorn-gthread"](port),
        namespace.env(url),
        lambda: _answers_get(port),
    )
    if store != "redis":
        warm = burst(port, [f"evt_warm_{n:02d}" for n in range(64)], copies=1, threads=64)
        assert Counter(answer.status for answer in warm) == {200: 64}
    base = int(time.time()) - 3600
    bodies = {}
    for number in range(24):
        event = build_event(
            "customer.tier_changed",
            {"customerEmail": "jane@example.com", "newTier": f"t{number}", "hold": 0.02},
            id=f"evt_t{number:02d}",
            timestamp=datetime.fromtimestamp(base + number, tz=UTC),
        )
        bodies[number] = json.dumps(event).encode()
    order = list(bodies)
    random.Random(24).shuffle(order)

    def deliver(number: int) -> list[Answer]:
        answers = [post(port, f"evt_t{number:02d}", bodies[number])]
        deadline = time.monotonic() + 60
        while answers[-1].status == 409 and time.monotonic() < deadline:
            time.sleep(random.uniform(0.0, 0.05))
            answers.append(post(port, f"evt_t{number:02d}", bodies[number]))
        return answers

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = [a for each in pool.map(deliver, order) for a in each]
    statuses = Counter(answer.status for answer in answers)
    print(f"{len(answers)} deliveries: {dict(statuses)}")
    assert set(statuses) <= {200, 409}, [a for a in answers if a.status not in (200, 409)]
    assert statuses[200] == 24
    assert max(answer.seconds for answer in answers) < SLOWEST
    applied = [
        int(item.decode()[len("evt_t") :])
        for item in namespace.client.lrange(f"{namespace.name}:tiers", 0, -1)
    ]
    assert applied == sorted(set(applied))
    assert applied[-1] == 23
    assert len([name for name in namespace.effects() if name.startswith("evt_t")]) == 24
    if store != "redis":
        import psycopg

        dsn = request.getfixturevalue("postgres_store")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f"DROP TABLE IF EXISTS {unique}_store_order")


# --- the production shape: nginx terminating TLS in front of gunicorn -------

NGINX_CONF = """\
daemon off;
worker_processes 1;
# Ignored (with a warning) unless started as root; as root, workers keep the
# rights to this private directory.
user {user} {group};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{
    worker_connections 128;
}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout 5s;
            proxy_read_timeout 10s;
        }}
    }}
}}
"""


def _program(name: str, *fallbacks: str) -> str:
    """The path of a program the tests drive, or skip (fail in CI)."""
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate)
        if found is not None:
            return found
    missing(f"{name} is not installed (Debian package: see .ci/run)")


@dataclass
class Proxied:
    """nginx on :attr:`https_port` in front of gunicorn on :attr:`http_port`."""

    https_port: int
    http_port: int
    cert: Path
    context: ssl.SSLContext
    namespace: Namespace
    directory: Path

    @property
    def https_url(self) -> str:
        """The endpoint through nginx."""
        return f"https://127.0.0.1:{self.https_port}{URL_PATH}"

    @property
    def http_url(self) -> str:
        """The endpoint straight on gunicorn."""
        return f"http://127.0.0.1:{self.http_port}{URL_PATH}"


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    openssl = _program("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture(scope="module")
def module_namespace() -> t.Iterator[Namespace]:
    """Redis names for the module's shared servers; removed after."""
    yield from _namespace(f"ploints_test_{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def proxied(
    tmp_path_factory: pytest.TempPathFactory, module_namespace: Namespace
) -> t.Iterator[Proxied]:
    """One nginx and one gunicorn for the module's production-shape tests
    (each uses ids of its own); both stopped, and the keys removed, after.
    """
    nginx = _program("nginx", "/usr/sbin/nginx")
    directory = tmp_path_factory.mktemp("proxied")
    cert, key = _certificate(directory)
    context = ssl.create_default_context(cafile=str(cert))
    started: list[Server] = []
    try:
        http_port = _free_port()
        # gthread, trusting no proxy: gunicorn would otherwise honour
        # X-Forwarded-Proto from loopback itself; here only ProxyFix does.
        command = _gunicorn(
            http_port,
            "--worker-class",
            "gthread",
            "--threads",
            "32",
            "--forwarded-allow-ips",
            "192.0.2.1",
        )
        gunicorn = Server(
            "gunicorn-behind-nginx",
            command,
            {**module_namespace.env(), "PLOINTS_SERVERS_BEHIND_PROXY": "1"},
            directory / "gunicorn.log",
        )
        started.append(gunicorn)
        gunicorn.wait_until(lambda: _answers_get(http_port))

        https_port = _free_port()
        conf = directory / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                user=pwd.getpwuid(os.getuid()).pw_name,
                group=grp.getgrgid(os.getgid()).gr_name,
                prefix=directory,
                port=https_port,
                upstream=http_port,
                cert=cert,
                key=key,
            )
        )
        proxy = Server(
            "nginx",
            [nginx, "-e", str(directory / "error.log"), "-p", f"{directory}/", "-c", str(conf)],
            {},
            directory / "nginx.log",
        )
        started.append(proxy)
        proxy.wait_until(lambda: _answers_get(https_port, context=context))
        yield Proxied(https_port, http_port, cert, context, module_namespace, directory)
    finally:
        for server in reversed(started):
            server.stop()
        (directory / "error.log").touch()
        print(f"--- nginx error.log ---\n{(directory / 'error.log').read_text()[-4000:]}")
        for server in started:
            print(f"--- {server.name} ---\n{server.output()}")


def test_https_through_nginx(proxied: Proxied) -> None:
    body = event_body("evt_https")
    first = post(proxied.https_port, "evt_https", body, context=proxied.context)
    assert (first.status, first.content_type, first.json()) == (200, "application/json", PROCESSED)
    again = post(proxied.https_port, "evt_https", body, context=proxied.context)
    assert (again.status, again.json()) == (200, DUPLICATE)
    assert proxied.namespace.effects()["evt_https"] == 1


def test_plain_http_straight_to_gunicorn_is_403(proxied: Proxied) -> None:
    body = event_body("evt_plain")
    plain = post(proxied.http_port, "evt_plain", body)
    assert (plain.status, plain.content_type) == (403, "application/json"), plain
    assert plain.json() == {"error": "HTTPS required"}
    assert "evt_plain" not in proxied.namespace.effects()
    # The very same request through nginx passes: what differs is nginx's
    # X-Forwarded-Proto, read by ProxyFix.
    through = post(proxied.https_port, "evt_plain", body, context=proxied.context)
    assert (through.status, through.json()) == (200, PROCESSED)
    assert proxied.namespace.effects()["evt_plain"] == 1


def curl(
    url: str, body_file: Path, signature: str, cacert: Path, *options: str
) -> tuple[int, t.Any, str]:
    """POST ``body_file`` with curl; return the status, the parsed body and
    curl's verbose log (what went over the wire).
    """
    output = body_file.with_suffix(".answer")
    result = subprocess.run(
        [
            _program("curl"),
            "--silent",
            "--show-error",
            "--verbose",
            "--http1.1",
            "--max-time",
            str(int(CLIENT_TIMEOUT)),
            "--cacert",
            str(cacert),
            "-H",
            "Content-Type: application/json",
            "-H",
            f"X-Ploints-Signature: {signature}",
            "--data-binary",
            f"@{body_file}",
            "--output",
            str(output),
            "--write-out",
            "%{http_code}",
            *options,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT + 5,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout), json.loads(output.read_bytes()), result.stderr


#: Each way curl sends, and what it shows in curl's verbose log.
CURL_WAYS: dict[str, tuple[list[str], str]] = {
    "data-binary": ([], "> Content-Length: "),
    "chunked": (["-H", "Transfer-Encoding: chunked"], "> Transfer-Encoding: chunked"),
    "expect-100-continue": (["-H", "Expect: 100-continue"], "< HTTP/1.1 100 Continue"),
}


@pytest.mark.parametrize("way", list(CURL_WAYS))
def test_curl_through_nginx(proxied: Proxied, way: str) -> None:
    options, evidence = CURL_WAYS[way]
    event_id = f"evt_curl_{way.replace('-', '_')}"
    body = event_body(event_id, description="Café ☕ in one UTF-8 body")
    body_file = proxied.directory / f"{event_id}.json"
    body_file.write_bytes(body)
    signature = sign(body, SECRET)
    status, answer, log = curl(proxied.https_url, body_file, signature, proxied.cert, *options)
    assert (status, answer) == (200, PROCESSED), log
    assert evidence in log
    if way == "chunked":
        assert "> Content-Length" not in log
    status, answer, log = curl(proxied.https_url, body_file, signature, proxied.cert, *options)
    assert (status, answer) == (200, DUPLICATE), log
    assert proxied.namespace.effects()[event_id] == 1


def test_curl_chunked_straight_to_gunicorn(proxied: Proxied) -> None:
    # nginx buffers a chunked body and forwards it with a Content-Length;
    # straight to gunicorn the endpoint reads the chunked body itself. The
    # app wants HTTPS, so curl sends the header nginx would.
    body = event_body("evt_chunked_direct")
    body_file = proxied.directory / "chunked_direct.json"
    body_file.write_bytes(body)
    options = ["-H", "Transfer-Encoding: chunked", "-H", "X-Forwarded-Proto: https"]
    good, wrong = sign(body, SECRET), sign(body, "whsec_wrong")
    status, answer, log = curl(proxied.http_url, body_file, good, proxied.cert, *options)
    assert (status, answer) == (200, PROCESSED), log
    assert "> Transfer-Encoding: chunked" in log
    assert "> Content-Length" not in log
    status, answer, log = curl(proxied.http_url, body_file, wrong, proxied.cert, *options)
    assert (status, answer) == (401, {"error": "invalid signature"}), log
    status, answer, log = curl(proxied.http_url, body_file, good, proxied.cert, *options)
    assert (status, answer) == (200, DUPLICATE), log
    assert proxied.namespace.effects()["evt_chunked_direct"] == 1


#: The sender's Node example: the body is the string it signs and sends.
NODE_SENDER = """\
import crypto from "node:crypto";

const [url, secret, id] = process.argv.slice(2);
const rawBody = JSON.stringify({
  id,
  type: "points.earned",
  timestamp: new Date().toISOString(),
  data: { customerEmail: "jane@example.com", amount: 50, description: "Café ☕" },
});
const signature = crypto.createHmac("sha256", secret).update(rawBody).digest("hex");
const response = await fetch(url, {
  method: "POST",
  headers: { "Content-Type": "application/json", "X-Ploints-Signature": signature },
  body: rawBody,
  signal: AbortSignal.timeout(10000),
});
console.log(JSON.stringify({
  status: response.status,
  contentType: response.headers.get("content-type"),
  body: await response.json(),
}));
"""


def node_send(proxied: Proxied, secret: str, event_id: str) -> dict[str, t.Any]:
    """Run the Node sender against nginx, trusting the test's certificate."""
    node = _program("node", "nodejs")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < 18:
        missing(f"Node {version.stdout.strip()} has no global fetch; Node >= 18 is needed")
    script = proxied.directory / "sender.mjs"
    script.write_text(NODE_SENDER, encoding="utf-8")
    result = subprocess.run(
        [node, str(script), proxied.https_url, secret, event_id],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT + 5,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(proxied.cert)},
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, t.Any] = json.loads(result.stdout)
    return answer


def test_node_fetch_through_nginx(proxied: Proxied) -> None:
    assert node_send(proxied, SECRET, "evt_node") == {
        "status": 200,
        "contentType": "application/json",
        "body": PROCESSED,
    }
    assert node_send(proxied, "whsec_wrong", "evt_node_forged") == {
        "status": 401,
        "contentType": "application/json",
        "body": {"error": "invalid signature"},
    }
    effects = proxied.namespace.effects()
    assert (effects["evt_node"], effects["evt_node_forged"]) == (1, 0)
