"""Throughput and latency of the extension under gunicorn, beside a
hand-written receiver doing the same store work the plain way.

For each store (memory, Redis, PostgreSQL, MariaDB, and Redis with Celery
dispatch over RabbitMQ) and each receiver (the extension, and the
hand-written one of ``bench/gunicorn_apps.py``: on the driver's own
connection, or with ``--twin core`` through SQLAlchemy Core), the bench starts
gunicorn on a free loopback port, warms every worker up, then drives it with
``wrk`` (one thread, a fixed duration, a 10 s timeout: the sender's) posting
distinct pre-signed events through ``bench/post_events.lua``. ``--mode
sync``: 4 sync workers, 16 connections; ``--mode gthread``: 2 gthread
workers x 32 threads, 64 connections. Each pair runs in ``--rounds`` rounds
in alternating order (ABBA); the table shows the mean requests per second,
the median p50 and p99 latencies, the slowest answer of any round, and the
ratio with each round's own. Every run gets its own Redis prefix or table,
removed afterwards.

This machine's speed drifts by several percent from one minute to the next,
which moves the ratio of two runs made one after the other. ``--paired``
runs both receivers at the same time instead, each on its own gunicorn with
its own wrk, so that drift falls on both alike; the two share the cores
(each gets about half), and the start order alternates by round.
``--paired --against-itself`` puts the hand-written receiver in both slots:
what the method reads for two equal receivers, its bias and spread.

The load generator is ``wrk`` (Debian package ``wrk``: ``apt-get install
wrk``). It shares the machine's cores with the servers, as does the store's
own server, so the numbers are for this whole box, not for gunicorn alone.

``--paired --latest-by`` compares the cost of ``latest_by``: the
extension with a tier handler registered with ``latest_by`` in the first
slot, the same handler without it in the second, both sent tier changes of
500 customers (each applied, none stale).

Run: ``.venv/bin/python bench/gunicorn_bench.py [--mode sync|gthread] [--duration 10] [--rounds 2]
[--stores memory,redis,postgresql,mariadb,celery] [--twin hand|core] [--paired [--against-itself | --latest-by]]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from flask_ploints._samples import build_event

HERE = Path(__file__).resolve().parent
SECRET = "whsec_bench_gunicorn"
URL_PATH = "/webhooks/ploints"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
TYPES = ("points.earned", "points.redeemed", "customer.created", "badge.issued")
KINDS = ("extension", "hand")


@dataclass(frozen=True)
class Mode:
    """How gunicorn runs and how hard wrk drives it."""

    name: str
    workers: int
    threads: int
    connections: int

    def gunicorn_args(self) -> list[str]:
        """The worker options of gunicorn's command line."""
        args = ["--workers", str(self.workers)]
        if self.threads > 1:
            args += ["--worker-class", "gthread", "--threads", str(self.threads)]
        return args

    def describe(self) -> str:
        """One line for the report."""
        workers = (
            f"{self.workers} sync workers"
            if self.threads == 1
            else f"{self.workers} gthread workers x {self.threads} threads"
        )
        return f"{workers}, wrk -t1 -c{self.connections}"


MODES = {
    "sync": Mode("sync", workers=4, threads=1, connections=16),
    # A threaded server with more threads per process than the SQL store's
    # pool holds connections (5 + 10).
    "gthread": Mode("gthread", workers=2, threads=32, connections=64),
}


@dataclass
class Result:
    """What wrk measured in one run."""

    requests: int
    duration_us: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    non_2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    wrapped: int

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / (self.duration_us / 1e6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reachable(url: str, default_port: int) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or default_port), timeout=1).close()
    except OSError:
        return False
    return True


def write_events(path: Path, count: int, prefix: str, tiers: bool = False) -> None:
    """Write ``count`` distinct signed events as ``signature<TAB>body`` lines;
    tier changes of 500 customers when ``tiers``.
    """
    key = SECRET.encode()
    with path.open("w") as out:
        for number in range(count):
            event_id = f"{prefix}_{number:08d}"
            if tiers:
                data = {"customerEmail": f"c{number % 500}@example.com", "newTier": f"t{number}"}
                event = build_event("customer.tier_changed", data, id=event_id)
            else:
                event = build_event(TYPES[number % len(TYPES)], id=event_id)
            body = json.dumps(event)
            signature = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
            out.write(f"{signature}\t{body}\n")


def _post(port: int, body: bytes) -> int:
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            URL_PATH,
            body=body,
            headers={"Content-Type": "application/json", "X-Ploints-Signature": signature},
        )
        return connection.getresponse().status
    finally:
        connection.close()


class Server:
    """``gunicorn -w 4`` running one receiver of ``gunicorn_apps``."""

    def __init__(self, kind: str, store: str, namespace: str, log: Path, mode: Mode) -> None:
        self.mode = mode
        self.port = _free_port()
        self.log = log.open("wb")
        env = {
            **os.environ,
            "BENCH_KIND": kind,
            "BENCH_STORE": store,
            "BENCH_NAMESPACE": namespace,
            "BENCH_REDIS_URL": REDIS_URL,
            "BENCH_POSTGRES_URL": POSTGRES_URL,
            "BENCH_MARIADB_URL": MARIADB_URL,
            "BENCH_BROKER_URL": BROKER_URL,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--chdir",
                str(HERE),
                *mode.gunicorn_args(),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--graceful-timeout",
                "5",
                "gunicorn_apps:create_app()",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.log.name}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    connection.request("GET", URL_PATH)
                    if connection.getresponse().status == 405:
                        return
                finally:
                    connection.close()
            time.sleep(0.1)
        raise RuntimeError("gunicorn did not answer within 30 s")

    def warm_up(self, prefix: str) -> None:
        """Post distinct events from several threads until every worker has
        served some (imports done, store connected).
        """
        bodies = [
            json.dumps(build_event("points.earned", id=f"{prefix}_warm_{n}")).encode()
            for n in range(200)
        ]
        with ThreadPoolExecutor(max_workers=self.mode.connections) as pool:
            statuses = set(pool.map(lambda body: _post(self.port, body), bodies))
        if len(statuses) != 1 or not 200 <= statuses.pop() < 300:
            raise RuntimeError(f"warm-up answered {statuses}; see {self.log.name}")

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()


def _mariadb() -> t.Any:
    import pymysql
    import sqlalchemy as sa

    url = sa.make_url(MARIADB_URL)
    return pymysql.connect(
        host=url.host,
        port=url.port or 3306,
        user=url.username,
        database=url.database,
        autocommit=True,
    )


def prepare(kind: str, store: str, namespace: str) -> None:
    """Create what a run needs before its workers start."""
    if store == "postgresql" and kind in ("hand", "core"):
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(
                f"CREATE TABLE {namespace} (id text PRIMARY KEY, status text NOT NULL)"
            )
    elif store == "mariadb" and kind in ("hand", "core"):
        connection = _mariadb()
        with connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TABLE {namespace} (id VARCHAR(255) PRIMARY KEY, status VARCHAR(16) NOT NULL)"
            )
        connection.close()


def clean(store: str, namespace: str) -> None:
    """Remove a run's keys, table or queue."""
    if store == "celery":
        from kombu import Connection

        with Connection(BROKER_URL) as connection:
            connection.default_channel.queue_delete(namespace)
    if store in ("redis", "celery"):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{namespace}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
        client.close()
    elif store == "postgresql":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f"DROP TABLE IF EXISTS {namespace}")
            connection.execute(f"DROP TABLE IF EXISTS {namespace}_order")
    elif store == "mariadb":
        maria = _mariadb()
        with maria.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {namespace}, {namespace}_order")
        maria.close()


def run_wrk(port: int, events: Path, duration: float, mode: Mode) -> Result:
    """Drive the server with wrk and return what it measured."""
    command = [
        "wrk",
        "-t1",
        f"-c{mode.connections}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "post_events.lua"),
        f"http://127.0.0.1:{port}",
        "--",
        str(events),
        "1",
    ]
    output = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=duration + 120
    ).stdout
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return Result(**json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"wrk printed no RESULT line:\n{output}")


def one_run(
    kind: str, store: str, events: Path, duration: float, logs: Path, number: int, mode: Mode
) -> Result:
    """Start a fresh server for ``kind`` on ``store``, measure it, clean up."""
    namespace = f"bench_{uuid.uuid4().hex[:10]}"
    prepare(kind, store, namespace)
    try:
        server = Server(kind, store, namespace, logs / f"{store}-{kind}-{number}.log", mode)
        try:
            server.warm_up(namespace)
            return run_wrk(server.port, events, duration, mode)
        finally:
            server.stop()
    finally:
        clean(store, namespace)


def paired_run(
    store: str,
    events: Path,
    duration: float,
    logs: Path,
    number: int,
    mode: Mode,
    kinds: tuple[str, str],
) -> dict[str, Result]:
    """Start both receivers at once, each on its own gunicorn, and drive
    them with a wrk each for the same ``duration``: the machine's drift
    from minute to minute falls on both alike. ``kinds`` are the receivers
    for the extension's slot and the hand-written one's (``("hand",
    "hand")`` measures the method against itself); odd rounds start the
    hand-written slot first.
    """
    slots = dict(zip(KINDS, kinds, strict=True))
    order = KINDS if number % 2 == 0 else tuple(reversed(KINDS))
    namespaces = {slot: f"bench_{uuid.uuid4().hex[:10]}" for slot in order}
    servers: dict[str, Server] = {}
    try:
        for slot in order:
            prepare(slots[slot], store, namespaces[slot])
            log = logs / f"{store}-{slot}-{number}.log"
            servers[slot] = Server(slots[slot], store, namespaces[slot], log, mode)
            servers[slot].warm_up(namespaces[slot])
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = {
                slot: pool.submit(run_wrk, servers[slot].port, events, duration, mode)
                for slot in order
            }
            return {slot: running[slot].result() for slot in KINDS}
    finally:
        for server in servers.values():
            server.stop()
        for namespace in namespaces.values():
            clean(store, namespace)


def machine() -> str:
    """One line on the machine the numbers come from."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores (nproc), {model}, {platform.system()} {platform.release()}"


def service_versions(stores: list[str]) -> list[str]:
    """Versions of the store servers in use."""
    found = []
    if "redis" in stores or "celery" in stores:
        import redis

        info = redis.Redis.from_url(REDIS_URL).info("server")
        found.append(f"Redis {info['redis_version']}")
    if "postgresql" in stores:
        import psycopg

        with psycopg.connect(POSTGRES_URL) as connection:
            row = connection.execute("SHOW server_version").fetchone()
            found.append(f"PostgreSQL {row[0] if row else '?'}")
    if "mariadb" in stores:
        maria = _mariadb()
        found.append(f"MariaDB {maria.get_server_info()}")
        maria.close()
    if "celery" in stores:
        from kombu import Connection

        with Connection(BROKER_URL) as connection:
            connection.connect()
            properties = connection.connection.server_properties
            found.append(f"RabbitMQ {properties.get('version', '?')}, Celery {version('celery')}")
    return found


def table(
    results: dict[str, dict[str, list[Result]]],
    duration: float,
    rounds: int,
    labels: tuple[str, str],
) -> str:
    """The markdown table for the README."""
    lines = [
        "| store | receiver | requests/s | p50 ms | p99 ms | max ms | extension / hand-written"
        " (per round) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for store, by_kind in results.items():
        rates = {kind: statistics.mean(r.rate for r in runs) for kind, runs in by_kind.items()}
        # Round by round, ext against hand in the same round: the spread.
        per_round = [
            ext.rate / hand.rate
            for ext, hand in zip(by_kind["extension"], by_kind["hand"], strict=True)
        ]
        for kind in KINDS:
            runs = by_kind[kind]
            p50 = statistics.median(r.p50_us for r in runs) / 1000
            p99 = statistics.median(r.p99_us for r in runs) / 1000
            worst = max(r.max_us for r in runs) / 1000
            label = labels[KINDS.index(kind)]
            name = "redis + celery (202)" if store == "celery" else store
            ratio = ""
            if kind == "extension":
                spread = ", ".join(f"{value:.2f}" for value in per_round)
                ratio = f"**{rates['extension'] / rates['hand']:.2f}x** ({spread})"
            lines.append(
                f"| {name} | {label} | {rates[kind]:,.0f} | {p50:.1f} | {p99:.1f} | {worst:,.0f}"
                f" | {ratio} |"
            )
    return "\n".join(lines)


def line(store: str, kind: str, number: int, result: Result) -> str:
    """One run's line of progress, with any errors wrk counted."""
    problems = {
        name: value
        for name, value in vars(result).items()
        if name.endswith(("errors", "timeouts", "non_2xx", "wrapped")) and value
    }
    return (
        f"{store:>10} {kind:>9} round {number + 1}: {result.rate:8,.0f} req/s"
        f"  p50 {result.p50_us / 1000:5.1f} ms  p99 {result.p99_us / 1000:5.1f} ms"
        f"  max {result.max_us / 1000:6.0f} ms" + (f"  {problems}" if problems else "")
    )


def main() -> None:
    """Run every store and receiver, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per receiver and store")
    parser.add_argument("--stores", default="memory,redis,postgresql,celery")
    parser.add_argument("--events", type=int, default=200_000, help="distinct events to send")
    parser.add_argument("--mode", choices=sorted(MODES), default="sync", help="gunicorn workers")
    parser.add_argument(
        "--paired", action="store_true", help="run both receivers at the same time, each round"
    )
    parser.add_argument(
        "--against-itself",
        action="store_true",
        help="with --paired: the hand-written receiver in both slots, to see the method's bias",
    )
    parser.add_argument(
        "--twin",
        choices=("hand", "core"),
        default="hand",
        help="the hand-written receiver's SQL: the driver's own (hand) or SQLAlchemy Core (core)",
    )
    parser.add_argument(
        "--latest-by",
        action="store_true",
        help="with --paired: a tier handler with latest_by against the same without it",
    )
    args = parser.parse_args()
    if args.against_itself and not args.paired:
        parser.error("--against-itself needs --paired")
    if args.latest_by and not args.paired:
        parser.error("--latest-by needs --paired")
    mode = MODES[args.mode]

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    stores = []
    for store in args.stores.split(","):
        if store == "redis" and not _reachable(REDIS_URL, 6379):
            print(f"skipping redis: nothing listens at {REDIS_URL}")
        elif store == "postgresql" and not _reachable(POSTGRES_URL, 5432):
            print(f"skipping postgresql: nothing listens at {POSTGRES_URL}")
        elif store == "mariadb" and not _reachable(MARIADB_URL.split("+", 1)[-1], 3306):
            print(f"skipping mariadb: nothing listens at {MARIADB_URL}")
        elif store == "celery" and not (
            _reachable(REDIS_URL, 6379) and _reachable(BROKER_URL, 5672)
        ):
            print(f"skipping celery: nothing listens at {REDIS_URL} or {BROKER_URL}")
        else:
            stores.append(store)

    results: dict[str, dict[str, list[Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="ploints-bench-") as directory:
        work = Path(directory)
        events = work / "events.tsv"
        write_events(events, args.events, f"evt_{uuid.uuid4().hex[:8]}", tiers=args.latest_by)
        twin = args.twin
        kinds = (twin, twin) if args.against_itself else ("extension", twin)
        if args.latest_by:
            kinds = ("latest_by", "tier")
        for store in stores:
            results[store] = {kind: [] for kind in KINDS}
            for number in range(args.rounds):
                if args.paired:
                    measured = paired_run(store, events, args.duration, work, number, mode, kinds)
                else:
                    order = KINDS if number % 2 == 0 else tuple(reversed(KINDS))
                    slots = dict(zip(KINDS, kinds, strict=True))
                    measured = {
                        slot: one_run(slots[slot], store, events, args.duration, work, number, mode)
                        for slot in order
                    }
                for kind, result in measured.items():
                    results[store][kind].append(result)
                    print(line(store, kind, number, result), flush=True)

    today = datetime.date.today().isoformat()
    how = (
        "both receivers at the same time, each"
        if args.paired
        else "one receiver at a time, in alternating order,"
    )
    print()
    print(
        f"gunicorn {version('gunicorn')} with {mode.describe()}"
        f" for {args.duration:g} s per run, {args.rounds} runs each ({how} on its own"
        f" gunicorn; mean req/s, median latencies); distinct pre-signed events; loopback; {today}"
        + ("; the hand-written receiver in both slots" if args.against_itself else "")
        + ("; tier changes, with latest_by against without" if args.latest_by else "")
        + ("; the hand-written receiver through SQLAlchemy Core" if args.twin == "core" else "")
    )
    print(
        f"Machine: {machine()}; Python {platform.python_version()}, Flask {version('flask')},"
        f" {', '.join(service_versions(stores))}"
    )
    print()
    labels = (
        ("hand-written", "hand-written")
        if args.against_itself
        else ("flask-ploints", "hand-written")
    )
    if args.twin == "core":
        labels = tuple(  # type: ignore[assignment]
            "SQLAlchemy Core" if label == "hand-written" else label for label in labels
        )
    if args.latest_by:
        labels = ("latest_by", "without")
    print(table(results, args.duration, args.rounds, labels))


if __name__ == "__main__":
    main()
