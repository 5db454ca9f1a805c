"""The sender, the gunicorn server and the Celery workers of
``tests/test_exactly_once.py``, around the app of :mod:`tests.crash_app`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flask import Flask

from flask_ploints._config import SENDER_RETRY_SCHEDULE
from flask_ploints._config import SENDER_TIMEOUT
from flask_ploints._samples import build_event
from flask_ploints.testing import PlointsClient

from . import crash_app
from .crash_app import Journal
from .test_celery import _queue_state
from .test_celery import _until
from .test_faults import WAIT
from .test_faults import Answer
from .test_faults import Gunicorn
from .test_faults import deliver

ROOT = Path(__file__).resolve().parent.parent
#: Events per test.
EVENTS = 5
#: Ploints' first five attempts, 600 times faster: retries after 0.1, 0.5,
#: 3 and 12 s.
SCHEDULE = tuple(delay / 600 for delay in SENDER_RETRY_SCHEDULE[:5])
_KILLED = re.compile(r"Worker \(pid:(\d+)\) was sent SIGKILL!")


@dataclass
class Delivery:
    """Every attempt the sender made at one event, until one got a 2xx."""

    event_id: str
    answers: list[Answer]

    @property
    def statuses(self) -> list[int]:
        """The status of each attempt (``0``: no answer)."""
        return [answer.status for answer in self.answers]

    @property
    def last(self) -> bytes:
        """The body of the last answer."""
        return self.answers[-1].body


def send(port: int, event_id: str, data: dict[str, t.Any]) -> Delivery:
    """Deliver one event as Ploints does: retry all but a 2xx answer."""
    body = json.dumps(build_event("points.earned", {"amount": 5, **data}, id=event_id)).encode()
    answers: list[Answer] = []
    for delay in SCHEDULE:
        # The sender's schedule, not a wait for a state.
        time.sleep(delay)
        answers.append(deliver(port, body, timeout=SENDER_TIMEOUT))
        if 200 <= answers[-1].status < 300:
            break
    return Delivery(event_id, answers)


@dataclass
class Server:
    """A gunicorn server of :mod:`tests.crash_app`, and the same app in
    this process to read its tables.
    """

    gunicorn: Gunicorn
    app: Flask
    journal: Journal

    def send(self, prefix: str, crash: str, *, together: bool = False) -> list[Delivery]:
        """Send :data:`EVENTS` events that crash at ``crash``, one after the
        other, or all at once (``together``).
        """
        ids = [f"evt_{prefix}_{number}" for number in range(EVENTS)]
        port = self.gunicorn.port
        if not together:
            return [send(port, event_id, {"crash": crash}) for event_id in ids]
        with ThreadPoolExecutor(max_workers=EVENTS) as pool:
            futures = [pool.submit(send, port, event_id, {"crash": crash}) for event_id in ids]
            return [future.result(timeout=WAIT * 3) for future in futures]

    def credit_pids(self, ids: list[str]) -> dict[str, list[int]]:
        """The pid of the writer of each credit row of ``ids``."""
        found = crash_app.credit_pids(self.app)
        return {event_id: found[event_id] for event_id in ids if event_id in found}

    def states(self, ids: list[str]) -> dict[str, str | None]:
        """The dedupe store's state of each of ``ids``."""
        with self.app.app_context():
            store = crash_app.store(self.app)
            return {event_id: getattr(store.get(event_id), "status", None) for event_id in ids}

    def killed(self) -> set[int]:
        """The pids of the workers gunicorn reported SIGKILLed."""
        return {int(pid) for pid in _KILLED.findall(self.gunicorn.log_path.read_text())}

    def crashes(self, ids: list[str], before: set[int]) -> dict[str, int]:
        """Check that each of ``ids`` crashed once, each in a worker of its
        own that gunicorn then reaped as SIGKILLed, and that no other worker
        died since ``before`` (:meth:`killed` then). Return the pid that
        crashed on each event.
        """
        crashes = {key: pid for key, pid in self.journal.crashes().items() if key in ids}
        assert sorted(crashes) == ids
        pids = set(crashes.values())
        assert len(pids) == EVENTS
        _until(lambda: self.killed() - before >= pids, "gunicorn to reap the killed workers")
        assert self.killed() - before == pids
        return crashes


class Workers:
    """The Celery workers of one test, on its queue.

    :param env: the ``PLOINTS_CRASH_*`` variables.
    :param logs: where each worker's output goes.
    """

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.queue = env["PLOINTS_CRASH_NAME"]
        self.broker = env["PLOINTS_CRASH_BROKER"]
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *, dies: bool = False) -> subprocess.Popen[bytes]:
        """Start a solo worker and wait until it consumes from the queue;
        with ``dies``, a worker meant to die on its first task, return at
        once: it may be gone before its consumer could be seen.
        """
        number = len(self.processes)
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.crash_app:celery",
            "worker",
            "--pool=solo",
            f"--queues={self.queue}",
            f"--hostname={self.queue}-{number}@%h",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
        with (self.logs / f"worker-{number}.log").open("wb") as output:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)

        def consuming() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker exited with {process.returncode}:\n{self.output()}")
            return _queue_state(self.broker, self.queue)[1] > 0

        if not dies:
            _until(consuming, "the worker to consume")
        return process

    def output(self) -> str:
        """Every worker's output, for failure messages."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')}"
            for log in sorted(self.logs.glob("worker-*.log"))
        )

    def stop(self) -> None:
        """Kill every worker still running (see ``tests/test_celery.py``)."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(WAIT)


@dataclass
class Queued:
    """A Celery test's endpoint app, its workers and journal."""

    app: Flask
    client: PlointsClient
    workers: Workers
    journal: Journal

    def state(self, event_id: str) -> str | None:
        """The dedupe store's state of ``event_id``."""
        with self.app.app_context():
            return getattr(crash_app.store(self.app).get(event_id), "status", None)
