"""Publishing a task with the broker's acknowledgement, every step bounded:
a publisher confirm on RabbitMQ, the reply to the ``LPUSH`` on Redis.

.. versionadded:: 0.2
"""

from __future__ import annotations

import os
import threading
import typing as t

__all__ = ["Publisher"]


class Publisher:
    """Publishes tasks over connections of its own, made from the Celery
    app's broker settings with publisher confirms on and every network step
    bounded by ``timeout``. The app's own pool is left as its owner set it.
    """

    def __init__(self, celery_app: t.Any, timeout: float) -> None:
        self.celery_app = celery_app
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pool: t.Any = None
        self._pid = 0

    def _connection(self) -> t.Any:
        options = dict(self.celery_app.conf.broker_transport_options or {})
        # Building a connection object does not connect.
        probe = self.celery_app.connection_for_write()
        # One attempt per broker URL, without sleeping in between: the
        # sender retries a 503 anyway, and kombu's loop of reconnects would
        # outlast its 10 s timeout.
        options["max_retries"] = max(len(probe.alt) - 1, 0)
        if probe.transport.driver_type == "amqp":
            # Passed to py-amqp's Connection: without confirms a message the
            # broker drops is never reported; without socket timeouts a
            # broker that accepts connections but never answers holds the
            # request.
            options.update(
                confirm_publish=True, read_timeout=self.timeout, write_timeout=self.timeout
            )
        else:
            # Redis has no confirms: the LPUSH is synchronous, and its reply
            # (sent after the append-only file's fsync with appendfsync
            # always) is the acknowledgement. Without socket timeouts it
            # waits forever for a broker that never answers.
            options.update(socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        return self.celery_app.connection_for_write(
            connect_timeout=self.timeout, transport_options=options
        )

    def _pool_here(self) -> t.Any:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # After a fork the parent's connections are the parent's:
                # they are dropped unclosed, since closing them would close
                # them for the parent too.
                self._pool = self._connection().Pool(limit=self.celery_app.conf.broker_pool_limit)
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        """Close the pooled connections of this process."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None and self._pid == os.getpid():
                pool.force_close_all()

    def publish(
        self, task: t.Any, args: tuple[t.Any, ...], *, pooled: bool, **options: t.Any
    ) -> None:
        """Publish one message of ``task`` and wait for the broker's
        acknowledgement: the confirm on RabbitMQ, the reply on Redis.

        :param pooled: take a connection from the pool (the endpoint), or
            use a new one that cannot have gone stale (the worker, which
            publishes rarely and must not lose a retry to a dead socket).
        :raises Exception: whatever the broker client raised.
        """
        if pooled:
            connection = self._pool_here().acquire(block=True, timeout=self.timeout)
        else:
            connection = self._connection()
        try:
            task.apply_async(
                args,
                connection=connection,
                retry=False,
                timeout=self.timeout,
                confirm_timeout=self.timeout,
                add_to_parent=False,
                **options,
            )
        except BaseException:
            # A confirm may still be on its way or a frame half written: the
            # next publish must not share this connection's state.
            connection.collect()
            raise
        finally:
            connection.release()
