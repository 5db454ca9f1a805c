"""Throughput and latency of the extension with ``PLOINTS_DEDUPE_STORE = db``
under gunicorn, beside a hand-written transactional twin measured in the
same run.

Both receivers of ``bench/transactional_apps.py`` write one row per event
through Flask-SQLAlchemy's ``db.session`` in one transaction with the
event's dedupe record: the extension through its
:class:`~flask_ploints.stores.SessionStore`, the twin with an ``INSERT ...
ON CONFLICT DO NOTHING RETURNING`` of the id, the same row, ``COMMIT``. For
each database (PostgreSQL, and SQLite in a file in WAL mode beside it) and
each receiver, the bench creates the run's own tables, starts gunicorn on a
free loopback port, warms every worker up, drives it with ``wrk`` (one
thread, a fixed duration, the sender's 10 s timeout) posting distinct
pre-signed ``points.earned`` events through ``bench/post_events.lua``,
stops gunicorn and drops the tables. ``--mode sync``: 4 sync workers, 16
connections; ``--mode gthread``: 2 gthread workers x 32 threads, 64
connections. The pairs run in ``--rounds`` rounds in alternating order
(ABBA); each round prints both receivers and its own ratio, and the table
at the end the mean requests per second, the median p50 and p99, and the
ratio extension / twin overall and per round.

``--latest-by`` measures what ``latest_by`` costs with ``db``: the same
handler registered with ``latest_by`` the customer's email, against itself
without it, on events about 500 customers in turn.

The load generator is ``wrk`` (``apt-get install wrk``). It shares the
machine's cores with gunicorn and the database, so the numbers are for the
whole box; on a small or busy machine the ratios are noisy.

Run (16 runs: about 4 minutes with the defaults on an idle 2-core machine, 6
when other work shares it)::

    .venv/bin/python bench/transactional_bench.py [--mode sync|gthread]
        [--duration 8] [--rounds 4] [--databases postgresql,sqlite] [--latest-by]
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

from gunicorn_bench import MODES
from gunicorn_bench import Mode
from gunicorn_bench import Result
from gunicorn_bench import line
from gunicorn_bench import machine
from gunicorn_bench import run_wrk
from transactional_apps import KINDS
from transactional_apps import SECRET
from transactional_apps import URL
from transactional_apps import create_tables
from transactional_apps import drop_tables

from flask_ploints._samples import SAMPLE_DATA
from flask_ploints._samples import build_event

HERE = Path(__file__).resolve().parent
_LABELS = {
    "extension": "flask-ploints",
    "twin": "hand-written twin",
    "latest_by": "flask-ploints, latest_by",
}
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def signed(event: dict[str, object]) -> tuple[bytes, str]:
    """The body of ``event`` and its signature, as the sender makes them."""
    body = json.dumps(event).encode()
    return body, hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def post(port: int, body: bytes, signature: str, timeout: float = 10.0) -> int:
    """Post one delivery; return the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "POST",
            URL,
            body=body,
            headers={"Content-Type": "application/json", "X-Ploints-Signature": signature},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


class Gunicorn:
    """gunicorn serving ``transactional_apps:create_app()`` with ``env``.

    :param args: gunicorn's worker options.
    :param env: the ``BENCH_*`` variables.
    :param log: where gunicorn's output goes.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log.open("wb")
        root = str(HERE.parent)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--chdir",
                str(HERE),
                *args,
                "--bind",
                f"127.0.0.1:{self.port}",
                "--graceful-timeout",
                "5",
                "transactional_apps:create_app()",
            ],
            # The checkout's flask_ploints, not an installed one.
            env={**os.environ, "PYTHONPATH": root, **env},
            cwd=root,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.log.name}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    connection.request("GET", URL)
                    if connection.getresponse().status == 405:
                        return
                finally:
                    connection.close()
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer within 60 s; see {self.log.name}")

    def workers(self) -> list[int]:
        """The pids of gunicorn's workers now."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in path.read_text().split()]
        return []

    def warm_up(self, prefix: str, threads: int) -> None:
        """Post distinct events from several threads until every worker has
        served some (imports done, database connected).
        """
        bodies = [signed(build_event("points.earned", id=f"{prefix}_w{n}")) for n in range(200)]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            statuses = set(pool.map(lambda pair: post(self.port, *pair), bodies))
        if statuses != {200}:
            raise RuntimeError(f"warm-up answered {statuses}; see {self.log.name}")

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log.close()


def write_events(path: Path, count: int, prefix: str, customers: int = 1) -> None:
    """Write ``count`` distinct signed events as ``signature<TAB>body`` lines,
    about ``customers`` customers in turn.
    """
    with path.open("w") as out:
        for number in range(count):
            data = None
            if customers > 1:
                email = f"c{number % customers}@example.com"
                data = {**SAMPLE_DATA["points.earned"], "customerEmail": email}
            event = build_event("points.earned", data, id=f"{prefix}_{number:08d}")
            body, signature = signed(event)
            out.write(f"{signature}\t{body.decode()}\n")


def one_run(kind: str, url: str, events: Path, duration: float, log: Path, mode: Mode) -> Result:
    """Measure ``kind`` on ``url`` with its own tables, then drop them."""
    namespace = f"tb_{uuid.uuid4().hex[:10]}"
    create_tables(url, namespace)
    try:
        env = {"BENCH_KIND": kind, "BENCH_DB_URL": url, "BENCH_NAMESPACE": namespace}
        server = Gunicorn(mode.gunicorn_args(), env, log)
        try:
            server.warm_up(namespace, mode.connections)
            return run_wrk(server.port, events, duration, mode)
        finally:
            server.stop()
    finally:
        drop_tables(url, namespace)


def table(results: dict[str, dict[str, list[Result]]], pair: tuple[str, str] = KINDS) -> str:
    """The markdown table: mean req/s, median p50 and p99, the ratios of
    ``pair``'s first receiver to its second.
    """
    first, second = pair
    lines = [
        f"| database | receiver | requests/s | p50 ms | p99 ms | {first} / {second} (per round) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, by_kind in results.items():
        rates = {kind: statistics.mean(r.rate for r in runs) for kind, runs in by_kind.items()}
        per_round = ", ".join(
            f"{a.rate / b.rate:.2f}" for a, b in zip(by_kind[first], by_kind[second], strict=True)
        )
        for kind in pair:
            runs = by_kind[kind]
            p50 = statistics.median(r.p50_us for r in runs) / 1000
            p99 = statistics.median(r.p99_us for r in runs) / 1000
            ratio = (
                f"**{rates[first] / rates[second]:.2f}x** ({per_round})" if kind == first else ""
            )
            lines.append(
                f"| {name} | {_LABELS[kind]} | {rates[kind]:,.0f} | {p50:.1f} | {p99:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run every database and receiver in ABBA rounds; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=4, help="runs per receiver and database")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--events", type=int, default=60_000, help="distinct events to send")
    parser.add_argument("--mode", choices=sorted(MODES), default="sync", help="gunicorn workers")
    parser.add_argument(
        "--latest-by",
        action="store_true",
        help="the handler registered with latest_by (500 customers) against the same without it",
    )
    args = parser.parse_args()
    pair = ("latest_by", "extension") if args.latest_by else KINDS
    mode = MODES[args.mode]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    results: dict[str, dict[str, list[Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="ploints-tbench-") as directory:
        work = Path(directory)
        events = work / "events.tsv"
        customers = 500 if args.latest_by else 1
        write_events(events, args.events, f"evt_{uuid.uuid4().hex[:8]}", customers)
        urls = {"postgresql": POSTGRES_URL, "sqlite": f"sqlite:///{work / 'bench.db'}"}
        for name in args.databases.split(","):
            results[name] = {kind: [] for kind in pair}
            for number in range(args.rounds):
                order = pair if number % 2 == 0 else tuple(reversed(pair))
                for kind in order:
                    log = work / f"{name}-{kind}-{number}.log"
                    result = one_run(kind, urls[name], events, args.duration, log, mode)
                    results[name][kind].append(result)
                    print(line(name, kind, number, result), flush=True)
                first, second = (results[name][kind][number] for kind in pair)
                ratio = first.rate / second.rate
                print(f"{name:>10} round {number + 1}: {pair[0]} / {pair[1]} {ratio:.2f}")

    print()
    print(
        f"gunicorn {version('gunicorn')} with {mode.describe()} for {args.duration:g} s per run,"
        f" {args.rounds} ABBA rounds (mean req/s, median latencies); distinct pre-signed"
        f" points.earned events, one row each; loopback; {datetime.date.today().isoformat()}"
    )
    print(
        f"Machine: {machine()}; Python {platform.python_version()}, Flask {version('flask')},"
        f" Flask-SQLAlchemy {version('flask-sqlalchemy')}, SQLAlchemy {version('sqlalchemy')},"
        f" psycopg {version('psycopg')}"
    )
    print()
    print(table(results, pair))


if __name__ == "__main__":
    main()
