"""Keeping a running task's message from a second worker on a Redis broker.

Redis gives a message back to the queue once it has stayed unacknowledged
for the transport's ``visibility_timeout``, whether or not its worker still
runs it. The copy carries the same claim token as the run, so the claim
cannot tell them apart, and the handlers would run twice. While the
handlers run, :func:`kept_from_others` renews the message's time in the
transport's index of unacknowledged messages every third of the visibility
timeout, so that only the message of a worker that died comes back.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import typing as t

__all__ = ["REDIS_VISIBILITY_TIMEOUT", "kept_from_others", "visibility_timeout"]

logger = logging.getLogger("flask_ploints")

#: kombu's Redis transport's ``visibility_timeout`` when none is set.
REDIS_VISIBILITY_TIMEOUT = 3600.0
#: The longest a renewal may wait for Redis, in seconds.
RENEWAL_TIMEOUT = 5.0


def visibility_timeout(celery_app: t.Any) -> float | None:
    """Return the seconds after which the broker gives an unacknowledged
    message to another worker, or ``None`` when the broker is not Redis.
    """
    # Building a connection object does not connect.
    if celery_app.connection_for_write().transport.driver_type != "redis":
        return None
    options = celery_app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", REDIS_VISIBILITY_TIMEOUT))


@contextlib.contextmanager
def kept_from_others(task: t.Any) -> t.Iterator[None]:
    """Renew the visibility of the message ``task`` runs, on a Redis broker,
    until the block ends. Elsewhere (another broker, an eager call) nothing.
    """
    properties = getattr(task.request, "properties", None) or {}
    tag = properties.get("delivery_tag")
    timeout = visibility_timeout(task.app) if tag is not None else None
    if timeout is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(
        target=_renew,
        args=(task.app, str(tag), timeout / 3, stop),
        name="flask-ploints-visibility",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # A renewal that lands after the acknowledgement changes nothing
        # (ZADD XX), so the join only bounds the thread's lifetime.
        thread.join(RENEWAL_TIMEOUT + 1)


def _renew(celery_app: t.Any, tag: str, interval: float, stop: threading.Event) -> None:
    connection: t.Any = None
    warned = False
    try:
        # The connection is made at the first renewal: a task shorter than
        # a third of the visibility timeout never opens one.
        while not stop.wait(interval):
            try:
                if connection is None:
                    options = dict(celery_app.conf.broker_transport_options or {})
                    options.update(
                        socket_timeout=RENEWAL_TIMEOUT, socket_connect_timeout=RENEWAL_TIMEOUT
                    )
                    connection = celery_app.connection_for_write(transport_options=options)
                channel = connection.default_channel
                if not channel.ack_emulation:
                    # No index to renew: Redis acknowledged the message
                    # when the worker took it.
                    return
                # XX: a message acknowledged or given back meanwhile is not
                # put back in the index.
                renewed = channel.client.zadd(
                    channel.unacked_index_key, {tag: time.time()}, xx=True, ch=True
                )
            except Exception:
                logger.warning("task message %s: visibility not renewed", tag, exc_info=True)
                if connection is not None:
                    connection.collect()
                    connection = None
                continue
            if not renewed and not warned:
                warned = True
                logger.warning(
                    "task message %s went back to the queue before its visibility was renewed;"
                    " another worker may run it",
                    tag,
                )
    finally:
        if connection is not None:
            connection.release()
