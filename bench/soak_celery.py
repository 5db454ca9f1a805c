"""The soak's Celery side (``bench/soak.py --celery``): a private RabbitMQ
node to restart without touching the machine's shared broker, and the
Celery workers of ``transactional_apps:celery``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from transactional_bench import HERE
from transactional_bench import free_port


class Broker:
    """A private RabbitMQ node on free ports, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.node = f"ploints_soak_{self.port}@localhost"
        self.dir = directory
        for sub in ("mnesia", "log"):
            (directory / sub).mkdir(parents=True)
        (directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\nERL_FLAGS='-kernel inet_dist_use_interface {127,0,0,1}'\n"
        )
        os.chmod(directory.parent, 0o755)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(directory)], check=True)
        env = (
            f"HOME=/var/lib/rabbitmq RABBITMQ_NODENAME={self.node}"
            f" RABBITMQ_CONF_ENV_FILE={directory}/env.conf"
            f" RABBITMQ_CONFIG_FILE={directory}/rabbitmq.conf"
            f" RABBITMQ_ENABLED_PLUGINS_FILE={directory}/enabled_plugins"
            f" RABBITMQ_MNESIA_BASE={directory}/mnesia RABBITMQ_LOG_BASE={directory}/log"
            f" RABBITMQ_DIST_PORT={free_port()}"
        )
        command = f"cd /var/lib/rabbitmq && {env} exec /usr/lib/rabbitmq/bin/rabbitmq-server"
        with (directory / "server.log").open("wb") as log:
            self.process = subprocess.Popen(
                ["su", "rabbitmq", "-s", "/bin/sh", "-c", command],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                # Fails at once until the node has registered with epmd.
                self.ctl("await_startup")
                break
            except subprocess.CalledProcessError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(1)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60) -> None:
        """Run ``rabbitmqctl`` against the private node."""
        subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            check=True,
            timeout=timeout,
            capture_output=True,
        )

    def restart(self) -> str:
        """``stop_app`` then ``start_app``: the broker's connections drop."""
        begun = time.monotonic()
        self.ctl("stop_app")
        time.sleep(2)  # an outage the publishers and workers see
        self.ctl("start_app")
        return f"RabbitMQ node {self.node} restarted ({time.monotonic() - begun:.1f} s down)"

    def stop(self) -> None:
        """Stop the node."""
        with contextlib.suppress(subprocess.SubprocessError):
            self.ctl("stop")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # su ends the node's session on SIGTERM.
            self.process.terminate()
            self.process.wait(timeout=30)


class CeleryWorkers:
    """``--count`` Celery workers of ``transactional_apps:celery``."""

    def __init__(self, env: dict[str, str], logs: Path, count: int = 2) -> None:
        self.env = env
        self.logs = logs
        self.count = count
        self.processes: list[subprocess.Popen[bytes]] = []
        self.start()

    def start(self) -> None:
        """Start the workers."""
        for _ in range(self.count):
            number = len(self.processes)
            with (self.logs / f"celery-{number}.log").open("wb") as log:
                self.processes.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, "-m", "celery", "-A", "transactional_apps:celery"),
                            *("worker", "--pool=prefork", "--concurrency=2", "--without-gossip"),
                            *("--without-mingle", "--loglevel=WARNING", f"--hostname=s{number}@%h"),
                            f"--queues={self.env['BENCH_NAMESPACE']}",
                        ],
                        cwd=HERE,
                        env={**os.environ, "PYTHONPATH": str(HERE.parent), **self.env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def stop(self) -> None:
        """Kill every worker with its pool children."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def restart(self) -> str:
        """Kill the workers (tasks in progress go back to the queue), start new ones."""
        self.stop()
        self.start()
        return f"Celery workers restarted (SIGKILL, {self.count} new)"
