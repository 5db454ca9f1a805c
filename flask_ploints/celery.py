"""Processing events on Celery workers: ``PLOINTS_DISPATCH = "celery"``.

.. code-block:: python

    app = Flask(__name__)
    celery_init_app(app)  # Flask's "Background Tasks with Celery" pattern
    app.config["PLOINTS_DISPATCH"] = "celery"
    webhooks = PlointsWebhooks(app)

The Celery app is ``PLOINTS_CELERY_APP`` (the ``celery_app`` option) when
set, else ``app.extensions["celery"]``, which must be there before
:meth:`~flask_ploints.PlointsWebhooks.init_app` runs. The worker imports the
module that builds the Flask app, so the same handlers are registered there.

**The endpoint** verifies a delivery, claims its id for
``PLOINTS_CELERY_LEASE`` (default one hour), publishes one task and only then
answers ``202``. The publish waits for the broker's confirm (py-amqp's
``confirm_publish``) and each of its steps (connect, send, confirm) for at
most ``PLOINTS_CELERY_PUBLISH_TIMEOUT`` (default 2 s); it is never retried. If
it fails the claim is released and the answer is ``503``: Ploints retries the
delivery, so nothing is lost. While the event waits in the queue or runs, a
duplicate delivery finds the claim and is answered ``409``.

**The worker** runs the task :data:`TASK_NAME` (``acks_late``,
``reject_on_worker_lost``, results ignored) in an app context:

1. It renews the lease with the claim's token. If the token no longer owns
   the claim, the worker claims the id again: when the event was processed
   or another delivery holds it, the task ends without running anything;
   when the lease had only run out (the task waited in the queue longer than
   the lease), the worker owns the id again and goes on.
2. It runs the instance's handlers, as the endpoint would.
3. On success it commits the id and sends
   :data:`~flask_ploints.signals.event_processed`.
4. When a handler raises, it keeps the claim, renews its lease and queues
   the next attempt after ``PLOINTS_CELERY_RETRY_BACKOFF`` seconds, doubled
   at each retry up to ``PLOINTS_CELERY_RETRY_BACKOFF_MAX``. After
   ``PLOINTS_CELERY_MAX_RETRIES`` retries it gives up: the store records the
   event as failed with the traceback, an error is logged and
   :data:`~flask_ploints.signals.handler_failed` is sent. A store that keeps
   payloads lets :func:`flask_ploints.replay.replay` run it again.

A worker that dies mid-task does not acknowledge the message: the broker
delivers it again (with the prefork pool the parent rejects it at once; with
RabbitMQ a dead worker's messages return to the queue when its connection
drops), and the new run renews the same claim and processes the event.

**At least once, as Celery is.** The handlers must be idempotent: a worker
that dies after a handler's effect but before the commit runs it again, and
with ``acks_late`` a worker that loses its broker connection mid-task has its
message delivered to another worker while it still runs (set Celery's
``worker_cancel_long_running_tasks_on_connection_loss`` to stop it). A task
that kills its worker every time (a hard time limit, memory) is delivered
again and again; a RabbitMQ quorum queue's delivery limit ends that.

Needs Celery: ``pip install 'flask-ploints[celery]'``. Importing
:mod:`flask_ploints` never imports this module.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t
import weakref
from dataclasses import dataclass
from dataclasses import field

from flask import Flask
from flask import current_app
from flask import has_app_context

from . import signals
from .config import CelerySettings
from .config import ConfigError
from .config import Settings
from .dispatch import DispatchError
from .events import Event
from .events import InvalidEvent
from .events import parse_event
from .replay import error_text
from .signals import notify
from .stores import ClaimStatus
from .stores import DedupeStore

try:
    import celery  # type: ignore[import-untyped]
    from celery.exceptions import Retry  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PLOINTS_DISPATCH = 'celery' needs Celery; install it with:"
        " pip install 'flask-ploints[celery]'"
    ) from exc

if t.TYPE_CHECKING:
    from .extension import Receiver
    from .stores import Claim

__all__ = ["TASK_NAME", "CeleryDispatcher"]

logger = logging.getLogger("flask_ploints")

#: The name of the task registered on the Celery app. Its arguments are the
#: instance's name, the event's raw body as a string and the claim's token.
TASK_NAME = "flask_ploints.process_event"


class _Publisher:
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
        """Publish one message of ``task`` and wait for the broker's confirm.

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


class CeleryDispatcher:
    """Hands each claimed event to a Celery worker; see the module.

    Built by the extension when ``PLOINTS_DISPATCH`` is ``"celery"``; the
    Celery app gets the task :data:`TASK_NAME` once, whatever the number of
    instances or Flask apps using it.

    :param celery_app: the Celery app to publish to and register the task on.
    :param settings: the instance's ``PLOINTS_CELERY_*`` settings.
    """

    runs_inline = False

    def __init__(self, celery_app: t.Any, settings: CelerySettings) -> None:
        self.celery_app = celery_app
        self.settings = settings
        #: ``PLOINTS_CELERY_LEASE``: the claim covers the wait in the queue,
        #: not only the handlers.
        self.lease = settings.lease
        self.task = _task_for(celery_app)
        self._publisher = _Publisher(celery_app, settings.publish_timeout)

    @classmethod
    def from_app(cls, app: Flask, settings: Settings) -> CeleryDispatcher:
        """Build the dispatcher of one instance on ``app``, with the Celery
        app of ``PLOINTS_CELERY_APP`` or else ``app.extensions["celery"]``.

        :raises ConfigError: neither is set, or it is not a Celery app.
        """
        celery_app = settings.celery.app
        where = "PLOINTS_CELERY_APP"
        if celery_app is None:
            celery_app = app.extensions.get("celery")
            where = 'app.extensions["celery"]'
        if celery_app is None:
            raise ConfigError(
                "PLOINTS_DISPATCH is 'celery' but there is no Celery app: set PLOINTS_CELERY_APP"
                ' to your celery.Celery instance, or put it in app.extensions["celery"] before'
                " init_app (as Flask's celery_init_app does)"
            )
        if not isinstance(celery_app, celery.Celery):
            raise ConfigError(
                f"{where} must be a celery.Celery instance, not {type(celery_app).__name__}"
            )
        dispatcher = cls(celery_app, settings.celery)
        _bind(celery_app, app)
        return dispatcher

    def dispatch(self, app: Flask, event: Event, claim: Claim, name: str) -> None:
        """Publish the event's task and wait for the broker to confirm it.

        :raises DispatchError: the broker could not be reached, refused the
            message or did not confirm it in time.
        """
        try:
            self._publish(name, event.raw, claim.token, pooled=True)
        except Exception as exc:
            raise DispatchError(f"could not queue event {event.id} on Celery: {exc!r}") from exc

    def close(self) -> None:
        """Close the broker connections this dispatcher keeps for publishing.
        A later delivery opens new ones.
        """
        self._publisher.close()

    def _publish(
        self, name: str, raw: bytes, token: str, *, pooled: bool, **options: t.Any
    ) -> None:
        if self.settings.queue is not None:
            options["queue"] = self.settings.queue
        # The body is valid UTF-8 (parse_event checked it), so the string
        # encodes back to the exact bytes that were signed.
        args = (name, raw.decode("utf-8"), token)
        self._publisher.publish(self.task, args, pooled=pooled, **options)


@dataclass
class _Binding:
    """What the worker needs to find the Flask app of a task. Held weakly,
    so that an app and its Celery app can be collected.
    """

    task: weakref.ref[t.Any]
    apps: list[weakref.ref[Flask]] = field(default_factory=list)


_bindings: weakref.WeakKeyDictionary[t.Any, _Binding] = weakref.WeakKeyDictionary()
_bindings_lock = threading.Lock()


def _task_for(celery_app: t.Any) -> t.Any:
    with _bindings_lock:
        binding = _bindings.get(celery_app)
        task = binding.task() if binding is not None else None
        if task is None:
            task = celery_app.task(
                name=TASK_NAME,
                bind=True,
                # The message is acknowledged once the task is settled, and
                # given back when the worker dies, so it is never lost.
                acks_late=True,
                reject_on_worker_lost=True,
                ignore_result=True,
                # Retries are counted and scheduled by _retry, per instance.
                max_retries=None,
                # Not on every Celery app, only this one; and now, not at
                # finalisation, so the dispatcher holds the real task.
                shared=False,
                lazy=False,
            )(_process_event)
            _bindings[celery_app] = _Binding(weakref.ref(task), binding.apps if binding else [])
        return task


def _bind(celery_app: t.Any, app: Flask) -> None:
    with _bindings_lock:
        binding = _bindings[celery_app]
        binding.apps = [ref for ref in binding.apps if ref() not in (None, app)]
        binding.apps.append(weakref.ref(app))


def _serves(app: Flask, celery_app: t.Any, name: str) -> bool:
    receiver = app.extensions.get("ploints", {}).get(name)
    return (
        receiver is not None
        and isinstance(receiver.dispatcher, CeleryDispatcher)
        and receiver.dispatcher.celery_app is celery_app
    )


def _flask_app(celery_app: t.Any, name: str) -> Flask:
    if has_app_context():
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        if _serves(app, celery_app, name):
            return app
    binding = _bindings.get(celery_app)
    for ref in reversed(binding.apps if binding is not None else []):
        found = ref()
        if found is not None and _serves(found, celery_app, name):
            return found
    raise RuntimeError(
        f"no Flask app in this worker has a PlointsWebhooks instance named {name!r} dispatching"
        " to this Celery app: the worker must import the module that builds the Flask app"
    )


def _process_event(task: t.Any, name: str, body: str, token: str) -> None:
    app = _flask_app(task.app, name)
    with app.app_context():
        receiver: Receiver = app.extensions["ploints"][name]
        _Attempt(task, app, receiver, body, token).run()


class _Attempt:
    """One run of the task for one event."""

    def __init__(self, task: t.Any, app: Flask, receiver: Receiver, body: str, token: str) -> None:
        self.task = task
        self.app = app
        self.receiver = receiver
        self.dispatcher = t.cast(CeleryDispatcher, receiver.dispatcher)
        self.settings = self.dispatcher.settings
        self.store: DedupeStore = receiver.store
        self.body = body
        self.token = token
        self.retries = int(task.request.retries or 0)

    def run(self) -> None:
        try:
            event = parse_event(self.body.encode("utf-8"))
        except InvalidEvent as exc:
            # Only this package publishes the task, from a verified body.
            logger.error("task %s carries no valid event (%s); dropped", self.task.request.id, exc)
            return
        try:
            owned = self._own(event)
        except Exception as exc:
            logger.warning("dedupe store failed before event %s (%s) ran", event.id, event.type)
            self._retry(event, exc, handlers_ran=False)
            return
        if not owned:
            return
        started = time.perf_counter()
        try:
            self.receiver.handlers.run(self.app, event, self.receiver.name)
        except Exception as exc:
            self._retry(event, exc, handlers_ran=True, duration=time.perf_counter() - started)
            return
        duration = time.perf_counter() - started
        self._commit(event)
        logger.info("event %s (%s) processed by a Celery worker", event.id, event.type)
        notify(
            signals.event_processed, self.app, self.receiver.name, event=event, duration=duration
        )

    def _own(self, event: Event) -> bool:
        if self.store.extend(event.id, self.token, self.settings.lease):
            return True
        claim = self.store.claim(event.id, self.settings.lease, event.raw)
        if claim.status is ClaimStatus.CLAIMED:
            logger.warning(
                "event %s (%s): its claim had lapsed (queued longer than PLOINTS_CELERY_LEASE?)"
                " and was taken again",
                event.id,
                event.type,
            )
            self.token = claim.token
            return True
        state = "processed" if claim.status is ClaimStatus.DONE else "held by another delivery"
        logger.info("event %s (%s) skipped by the worker: %s", event.id, event.type, state)
        return False

    def _commit(self, event: Event) -> None:
        # The handlers have run: a failed commit must not run them again.
        try:
            committed = self.store.commit(event.id, self.token, self.receiver.settings.retention)
        except Exception:
            logger.exception(
                "dedupe store failed to commit event %s; a duplicate may process it again", event.id
            )
            return
        if not committed:
            logger.warning(
                "event %s (%s) finished after its claim was taken over; it may run twice",
                event.id,
                event.type,
            )

    def _retry(
        self, event: Event, exc: Exception, *, handlers_ran: bool, duration: float = 0.0
    ) -> None:
        """Queue the next attempt and raise :class:`celery.exceptions.Retry`,
        or give up when the attempts are spent or the retry cannot be queued.
        """
        attempts = self.retries + 1
        total = self.settings.max_retries + 1
        note = ""
        if self.retries < self.settings.max_retries:
            delay = self.settings.retry_delay(self.retries)
            try:
                if handlers_ran and not self.store.extend(
                    event.id, self.token, self.settings.lease
                ):
                    logger.warning("event %s (%s): claim lost while failing", event.id, event.type)
                    return
                self.dispatcher._publish(
                    self.receiver.name,
                    event.raw,
                    self.token,
                    pooled=False,
                    countdown=delay,
                    retries=self.retries + 1,
                    task_id=self.task.request.id,
                )
            except Exception as publish_exc:
                note = f"\nThe retry could not be queued: {publish_exc!r}\n"
                logger.exception("event %s (%s): retry not queued", event.id, event.type)
            else:
                logger.warning(
                    "event %s (%s) failed (attempt %d of %d); retrying in %g s: %r",
                    event.id,
                    event.type,
                    attempts,
                    total,
                    delay,
                    exc,
                )
                raise Retry(exc=exc, when=delay)
        self._give_up(event, exc, handlers_ran=handlers_ran, duration=duration, note=note)

    def _give_up(
        self, event: Event, exc: Exception, *, handlers_ran: bool, duration: float, note: str
    ) -> None:
        attempts = self.retries + 1
        try:
            failed = self.store.fail(
                event.id, self.token, error_text(exc) + note, self.receiver.settings.retention
            )
        except Exception:
            logger.exception("dedupe store failed to record event %s as failed", event.id)
            failed = False
        logger.error(
            "event %s (%s) failed after %d attempt(s)%s; %s",
            event.id,
            event.type,
            attempts,
            "" if handlers_ran else " (dedupe store unavailable)",
            "recorded as failed: replay it with flask_ploints.replay.replay"
            if failed
            else "not recorded: have Ploints resend it",
            exc_info=exc,
        )
        if handlers_ran:
            notify(
                signals.handler_failed,
                self.app,
                self.receiver.name,
                event=event,
                exception=exc,
                duration=duration,
            )
