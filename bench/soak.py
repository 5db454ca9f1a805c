"""Soak: a simulated Ploints sends >= 10,000 events, with its real retry
schedule compressed in time, into 2 gunicorn servers x 4 sync workers
running the extension with ``PLOINTS_DEDUPE_STORE = db`` on PostgreSQL (a
handler adds one row per event through ``db.session``), while workers are
SIGKILLed and the app's database connections terminated. At the end it
counts the rows: every event must have exactly one.

The sender (``--senders`` threads, round robin over the servers) sends each
event once, paced at ``--rate`` events/s, and retries a failed attempt (a
connection error, a timeout after the sender's 10 s, any non-2xx status
such as 5xx or 409) after +1 min, +5 min, +30 min, +2 h, +12 h
(:data:`flask_ploints._config.SENDER_RETRY_SCHEDULE`) divided by ``--compress``
(default 500: the whole schedule in 105 s); after the last it gives up. On
purpose, as Ploints does when an answer is lost, some events are sent
again after a 2xx (``--lost-answers``), and some are sent twice at once
(``--overlaps``), as when the sender's timeout fires while the first
attempt still runs. Meanwhile a random gunicorn worker is SIGKILLed every
``--kill-every`` seconds, and every ``--terminate-every`` seconds
``pg_terminate_backend`` ends the app's connections (tagged with an
``application_name`` of the run's own, so nobody else's).

``--celery``: ``PLOINTS_DISPATCH = "celery"`` on RabbitMQ, with Celery
workers started by the script. The broker is a private RabbitMQ node on a
free port (restarting the machine's shared one would break whoever else
uses it), restarted once with ``rabbitmqctl stop_app && rabbitmqctl
start_app`` while events flow; when no private node can be started, the
shared broker is used and the Celery workers are restarted instead.

It prints events sent, processed (distinct ids with a row), lost (ids the
sender gave up on, or without a row), doubled (ids with more than one row),
the sender's failures by kind, workers killed, connections terminated; it
exits non-zero when anything was lost or doubled. Tables are the run's own
and dropped at the end.

Run: ``.venv/bin/python bench/soak.py [--events 10000] [--compress 500] [--celery]
[--plain-store]`` (``--plain-store``: the control, with the non-transactional SQL
store and a handler that commits its own row, where doubles are expected).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import http.client
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from soak_celery import Broker
from soak_celery import CeleryWorkers
from transactional_apps import create_tables
from transactional_apps import drop_tables
from transactional_bench import Gunicorn
from transactional_bench import post
from transactional_bench import signed

from flask_ploints._config import SENDER_RETRY_SCHEDULE as RETRY_SCHEDULE
from flask_ploints._config import SENDER_TIMEOUT as TIMEOUT
from flask_ploints._samples import build_event

DB_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SHARED_BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Restarts something and says what.
Restart = t.Callable[[], str]
TERMINATE = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'test'"
    " AND pid <> pg_backend_pid() AND application_name = %s"
)


@dataclass
class Attempt:
    """One chain of deliveries of an event, at its place in the schedule."""

    event_id: str
    body: bytes
    signature: str
    step: int = 0
    lose_answer: bool = False


class Sender:
    """The simulated Ploints: a schedule of due attempts and the threads
    that send them.
    """

    def __init__(self, ports: list[int], compress: float, threads: int) -> None:
        self.ports = itertools.cycle(ports)
        self.compress = compress
        self.threads = threads
        self.due: list[tuple[float, int, Attempt]] = []
        self.order = itertools.count()
        self.cond = threading.Condition()
        self.busy = 0
        self.feeding = True
        self.attempts = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.delivered: set[str] = set()
        self.chains: collections.Counter[str] = collections.Counter()
        self.gave_up: set[str] = set()
        self.lost_on_purpose = 0
        self.last_first = 0.0

    def add(self, attempt: Attempt, at: float, new_chain: bool = True) -> None:
        """Send ``attempt`` at monotonic time ``at``."""
        with self.cond:
            if new_chain:
                self.chains[attempt.event_id] += 1
            heapq.heappush(self.due, (at, next(self.order), attempt))
            self.cond.notify()

    def _next(self) -> Attempt | None:
        with self.cond:
            while True:
                if self.due and self.due[0][0] <= time.monotonic():
                    self.busy += 1
                    attempt = heapq.heappop(self.due)[2]
                    if not attempt.step:
                        self.last_first = time.monotonic()
                    return attempt
                if not self.due and not self.busy and not self.feeding:
                    self.cond.notify_all()
                    return None
                wait = self.due[0][0] - time.monotonic() if self.due else 0.5
                self.cond.wait(max(0.001, min(wait, 0.5)))

    def _send(self, attempt: Attempt) -> str | None:
        """Post once; return the failure's kind, ``None`` on a 2xx."""
        with self.cond:
            port = next(self.ports)
            self.attempts += 1
        try:
            status = post(port, attempt.body, attempt.signature, timeout=TIMEOUT)
        except TimeoutError:
            return "timeout"
        except (OSError, http.client.HTTPException):
            return "connection error"
        if 200 <= status < 300:
            return None
        return "5xx" if status >= 500 else str(status)

    def _settle(self, attempt: Attempt, failure: str | None) -> None:
        retry = False
        with self.cond:
            if failure is None:
                self.delivered.add(attempt.event_id)
                if attempt.lose_answer:
                    # As if the answer never reached the sender: it retries.
                    attempt.lose_answer = False
                    self.lost_on_purpose += 1
                    retry = True
            else:
                self.failures[failure] += 1
                retry = True
            if retry and attempt.step + 1 >= len(RETRY_SCHEDULE):
                retry = False
                if failure is not None:
                    self.chains[attempt.event_id] -= 1
                    if not self.chains[attempt.event_id] and (
                        attempt.event_id not in self.delivered
                    ):
                        self.gave_up.add(attempt.event_id)
        if retry:
            attempt.step += 1
            delay = RETRY_SCHEDULE[attempt.step] / self.compress
            self.add(attempt, time.monotonic() + delay, new_chain=False)

    def _loop(self) -> None:
        while (attempt := self._next()) is not None:
            try:
                self._settle(attempt, self._send(attempt))
            finally:
                with self.cond:
                    self.busy -= 1
                    self.cond.notify_all()

    def run(self, events: list[Attempt], rate: float, overlaps: set[str]) -> float:
        """Send every event at ``rate`` a second and wait until each chain
        succeeded or gave up; return the seconds it took.
        """
        started = time.monotonic()
        workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        for number, attempt in enumerate(events):
            at = started + number / rate
            self.add(attempt, at)
            if attempt.event_id in overlaps:
                self.add(Attempt(attempt.event_id, attempt.body, attempt.signature), at)
        with self.cond:
            self.feeding = False
            self.cond.notify_all()
        for worker in workers:
            worker.join()
        self.last_first -= started
        return time.monotonic() - started


class Chaos(threading.Thread):
    """SIGKILLs a random gunicorn worker every ``kill_every`` s, terminates
    the app's database connections every ``terminate_every`` s, and runs
    ``restart`` once at ``restart_at`` s.
    """

    def __init__(
        self,
        servers: list[Gunicorn],
        app_name: str,
        kill_every: float,
        terminate_every: float,
        restart: tuple[float, Restart] | None,
    ) -> None:
        super().__init__(daemon=True)
        self.servers = servers
        self.app_name = app_name
        self.kill_every = kill_every
        self.terminate_every = terminate_every
        self.restart = restart
        self.stopping = threading.Event()
        self.killed = 0
        self.terminated = 0
        self.restarts: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        next_kill = started + self.kill_every
        next_terminate = started + self.terminate_every
        url = DB_URL.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(url, autocommit=True, application_name="ploints_soak_chaos") as db:
            while not self.stopping.wait(0.05):
                now = time.monotonic()
                if now >= next_kill:
                    next_kill += self.kill_every
                    pids = random.choice(self.servers).workers()
                    if pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(random.choice(pids), signal.SIGKILL)
                            self.killed += 1
                if now >= next_terminate:
                    next_terminate += self.terminate_every
                    row = db.execute(TERMINATE, (self.app_name,)).fetchone()
                    self.terminated += int(row[0]) if row else 0
                if self.restart is not None and now - started >= self.restart[0]:
                    self.restarts.append(self.restart[1]())
                    self.restart = None


def rows(namespace: str) -> collections.Counter[str]:
    """How many award rows each event id has."""
    url = DB_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as db:
        found = db.execute(f"SELECT event_id, count(*) FROM {namespace}_awards GROUP BY event_id")
        return collections.Counter({event_id: int(count) for event_id, count in found})


def main() -> int:
    """Run the soak; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--compress", type=float, default=500.0, help="time compression factor")
    parser.add_argument("--rate", type=float, default=200.0, help="new events per second")
    parser.add_argument("--senders", type=int, default=16, help="concurrent sender threads")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="sync workers per server")
    parser.add_argument("--lost-answers", type=float, default=0.03, help="share resent after 2xx")
    parser.add_argument("--overlaps", type=float, default=0.01, help="share sent twice at once")
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--terminate-every", type=float, default=7.0)
    parser.add_argument("--celery", action="store_true", help="PLOINTS_DISPATCH = 'celery'")
    parser.add_argument(
        "--plain-store", action="store_true", help="control: the non-transactional SQL store"
    )
    parser.add_argument("--drain", type=float, default=180.0, help="max s for Celery to catch up")
    args = parser.parse_args()

    namespace = f"soak_{uuid.uuid4().hex[:10]}"
    random.seed(namespace)
    create_tables(DB_URL, namespace)
    env = {
        "BENCH_KIND": "extension",
        "BENCH_DB_URL": DB_URL,
        "BENCH_NAMESPACE": namespace,
        "BENCH_APP_NAME": namespace,
        "BENCH_PRE_PING": "1",
        "BENCH_STORE": "sql" if args.plain_store else "db",
    }
    work = Path(tempfile.mkdtemp(prefix="ploints-soak-"))
    cleanups: list[t.Callable[[], object]] = []
    try:
        restart: tuple[float, Restart] | None = None
        if args.celery:
            broker: Broker | None = None
            if shutil.which("rabbitmqctl"):
                try:
                    broker = Broker(work / "rabbitmq")
                    cleanups.append(broker.stop)
                except (OSError, subprocess.SubprocessError) as exc:
                    print(f"no private RabbitMQ node ({exc}); the shared broker is used")
            env["BENCH_BROKER_URL"] = broker.url if broker else SHARED_BROKER
            celery = CeleryWorkers(env, work)
            cleanups.append(celery.stop)
            when = args.events / args.rate / 2
            restart = (when, broker.restart if broker else celery.restart)
        gunicorn = ["--workers", str(args.workers), "--timeout", "30"]
        servers = []
        for number in range(args.servers):
            servers.append(Gunicorn(gunicorn, env, work / f"gunicorn-{number}.log"))
            cleanups.append(servers[-1].stop)
        events = []
        for number in range(args.events):
            body, signature = signed(build_event("points.earned", id=f"{namespace}_{number:06d}"))
            lose = random.random() < args.lost_answers
            events.append(Attempt(f"{namespace}_{number:06d}", body, signature, lose_answer=lose))
        overlaps = {e.event_id for e in events if random.random() < args.overlaps}
        sender = Sender([server.port for server in servers], args.compress, args.senders)
        chaos = Chaos(servers, namespace, args.kill_every, args.terminate_every, restart)
        chaos.start()
        span = sum(RETRY_SCHEDULE) / args.compress
        print(
            f"soak {namespace}: {args.events} events at {args.rate:g}/s into {args.servers}"
            f" gunicorn x {args.workers} sync workers{' + Celery' if args.celery else ''}"
            f"{', plain SQL store' if args.plain_store else ', SessionStore'};"
            f" retry schedule compressed {args.compress:g}x ({span:.0f} s); logs in {work}",
            flush=True,
        )
        took = sender.run(events, args.rate, overlaps)
        counts = rows(namespace)
        if args.celery:
            # The tasks queued for delivered events may still be running.
            deadline = time.monotonic() + args.drain
            while len(counts) < len(sender.delivered) and time.monotonic() < deadline:
                time.sleep(1)
                counts = rows(namespace)
        chaos.stopping.set()
        chaos.join(timeout=60)
        counts = rows(namespace)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        drop_tables(DB_URL, namespace)

    ids = {attempt.event_id for attempt in events}
    missing = ids - set(counts)
    lost = missing | sender.gave_up
    doubled = {event_id for event_id, count in counts.items() if count > 1}
    failures = ", ".join(f"{kind} {n}" for kind, n in sorted(sender.failures.items())) or "none"
    print(
        f"sending took {took:.1f} s (last first delivery at {sender.last_first:.1f} s);"
        f" {sender.attempts} attempts"
    )
    print(f"events sent:            {len(ids)}")
    print(
        f"duplicates on purpose:  {sender.lost_on_purpose} resent after a 2xx (answer lost),"
        f" {len(overlaps)} sent twice at once"
    )
    print(f"processed (with a row): {len(counts)}")
    print(
        f"lost:                   {len(lost)} ({len(sender.gave_up)} given up by the sender,"
        f" {len(missing)} without a row)"
    )
    print(f"doubled:                {len(doubled)}")
    print(f"sender-side failures:   {failures}")
    print(f"workers killed:         {chaos.killed}")
    print(f"connections terminated: {chaos.terminated}")
    if args.celery:
        print(f"restarted:              {'; '.join(chaos.restarts) or 'nothing (run too short)'}")
    for event_id in sorted(lost | doubled)[:10]:
        print(f"  {event_id}: {counts.get(event_id, 0)} row(s)")
    return 1 if lost or doubled else 0


if __name__ == "__main__":
    sys.exit(main())
